//! Pulling images from OCI/Docker registries (the distribution API): the
//! `docker://` transport and bare references like `ghcr.io/owner/name:tag`; and
//! pushing images to them.
//!
//! - [`reference`]: parsing and normalising references.
//! - [`auth`]: credentials, `WWW-Authenticate` challenges, bearer tokens.
//! - [`transport`]: HTTP agents (TLS trust, proxies, timeouts).
//! - [`client`]: one repository's requests: scheme, auth flow, redirects, retries.
//! - [`retry`]: backoff, `Retry-After`, the retry budget.
//! - [`cache`]: the shared content-addressed blob cache.
//! - [`download`]: streaming a blob into the cache with `Range` resume.
//! - [`progress`]: progress bars or periodic lines.
//! - [`push`]: uploading blobs (mount, monolithic, chunked) and a manifest.
//!
//! `source::registry` ties these together into a resolved image whose layers
//! are read from the cache by the usual flattener.

pub mod auth;
mod auth_flow;
pub mod cache;
pub mod client;
pub mod credhelper;
pub mod download;
pub mod progress;
pub mod push;
mod redirect;
pub mod reference;
mod request;
pub mod retry;
pub mod transport;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

pub use auth::Credentials;
pub use progress::ProgressMode;
pub use push::{push, BlobUpload, PushRequest, PushStats, UploadOptions};
pub use reference::Reference;
pub use retry::RetryPolicy;

/// Default number of parallel blob downloads.
pub const DEFAULT_JOBS: usize = 4;

/// How to reach registries and where to keep what was fetched.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Blob cache; `None` = `$XDG_CACHE_HOME/hakim-convert` or `~/.cache/hakim-convert`.
    pub cache_dir: Option<PathBuf>,
    /// `--creds`: used for the registry of the reference (and its token realm).
    pub credentials: Option<Credentials>,
    /// `--creds-file`: a file holding `user:password`.
    pub credentials_file: Option<PathBuf>,
    /// `--ca-cert`: trusted in addition to the system CA bundle.
    pub ca_certs: Vec<PathBuf>,
    /// `--insecure`: plain HTTP allowed for any host, certificates not verified.
    pub insecure: bool,
    /// Parallel blob downloads (at least 1).
    pub jobs: usize,
    pub retry: RetryPolicy,
    pub connect_timeout: Duration,
    /// A read that waits longer than this fails (and the download resumes).
    pub read_timeout: Duration,
    pub progress: ProgressMode,
    /// Set to stop downloads (Ctrl-C); partial files are removed.
    pub cancel: Arc<AtomicBool>,
    /// When pushing: monolithic or chunked uploads, and the chunk size.
    pub upload: UploadOptions,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            cache_dir: None,
            credentials: None,
            credentials_file: None,
            ca_certs: Vec::new(),
            insecure: false,
            jobs: DEFAULT_JOBS,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            progress: ProgressMode::Quiet,
            cancel: Arc::new(AtomicBool::new(false)),
            upload: UploadOptions::default(),
        }
    }
}

/// What a pull fetched and what the cache already held (`--json`:
/// `source.registry`). Counts layers, configs and manifests addressed by digest;
/// the lookup of a tag (one small manifest, always asked for) is not counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RegistryStats {
    /// Bytes received over the network, restarts included.
    pub bytes_downloaded: u64,
    /// Bytes found in the cache instead.
    pub bytes_reused: u64,
    pub blobs_downloaded: u64,
    pub blobs_reused: u64,
}
