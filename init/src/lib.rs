//! hakim-init: the PID 1 of Hakim workspaces.
//!
//! Reaps zombies, turns LXC/Proxmox/Docker stop signals into an ordered
//! shutdown, prepares the container (user, home, mounts, environment), and
//! supervises the Coder agent and a few declared services. What setup does to
//! the system goes through [`sys::Syscall`], what the supervisor does to
//! processes and time through [`sys::Host`], so the decisions (mounts,
//! permissions, restart backoff, readiness, stop order, graces) are unit-tested
//! without root or waiting, and the real calls are tested end to end.

pub mod agent;
pub mod agent_config;
pub mod boot;
pub mod env;
pub mod fetch;
pub mod home;
pub mod mounts;
pub mod services;
pub mod session;
pub mod spawn;
pub mod supervisor;
pub mod sys;
pub mod users;
pub mod workspace;
