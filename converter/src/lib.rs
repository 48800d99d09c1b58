//! hakim-convert: turn OCI/Docker images into Proxmox VE artifacts.
//!
//! The pipeline: a [`source`] resolves an image reference to a config and an
//! ordered list of layer blobs; [`flatten`] reads every layer once to build the
//! merged [`tree`] (metadata only, digests verified), then streams the layers a
//! second time through [`tarout`] and [`compress`] into an artifact written under
//! a temporary name by [`output`]. Registry sources are pulled by [`registry`] into
//! a shared blob cache first. Proxmox's acceptance rules live in [`acceptance`]:
//! `convert` applies them to what it writes, [`verify`] to what it reads.

pub mod acceptance;
pub mod batch;
pub mod compress;
pub mod convert;
pub mod diag;
pub mod digest;
pub mod fanout;
pub mod flatten;
pub mod gunzip;
pub mod inject;
pub mod layer;
pub mod ociout;
pub mod output;
pub mod path;
pub mod push_layout;
pub mod registry;
pub mod sample;
pub mod source;
pub mod tarout;
pub mod tarstream;
pub use hakim_netenv::text;
pub mod tree;
pub mod verify;
pub mod whiteout;
