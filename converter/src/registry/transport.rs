//! The HTTP agents: TLS trust (system CA bundle, `SSL_CERT_FILE`, `--ca-cert`,
//! `--insecure`), proxies from the environment, and timeouts.
//!
//! ureq 3 with rustls (ring provider), the stack hakim-init already uses: blocking
//! I/O fits a CLI whose every other step is blocking file I/O, and it spares the
//! binary an async runtime. Redirects are never followed by ureq: the client does it
//! so that `Authorization` can never reach another host.
//!
//! The proxy is chosen per URL (a registry redirects blobs to a CDN host that
//! `NO_PROXY` may treat differently), so there is one agent per route: direct,
//! through `https_proxy`, through `http_proxy`. Loopback is always direct.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};

use super::reference::is_loopback_host;

pub use hakim_netenv::{no_proxy_matches, ProxyEnv};

/// How the agents are built.
#[derive(Clone)]
pub struct TransportOptions {
    /// Accept any certificate (and, in the client, plain HTTP to any host).
    pub insecure: bool,
    /// Extra trusted CAs (`--ca-cert`), on top of the system's.
    pub ca_certs: Vec<PathBuf>,
    pub connect_timeout: Duration,
    /// Longest wait for any single read: a stalled transfer fails and is resumed.
    pub read_timeout: Duration,
    pub proxy: ProxyEnv,
    /// `SSL_CERT_FILE`, added like `--ca-cert`.
    pub ssl_cert_file: Option<PathBuf>,
}

/// The agents of one run.
pub struct Agents {
    direct: ureq::Agent,
    https_proxy: Option<ureq::Agent>,
    http_proxy: Option<ureq::Agent>,
    no_proxy: Option<String>,
}

impl Agents {
    pub fn new(opts: &TransportOptions) -> Result<Agents> {
        let mut added: Vec<PathBuf> = opts.ssl_cert_file.iter().cloned().collect();
        added.extend(opts.ca_certs.iter().cloned());
        let roots =
            hakim_netenv::ca::root_certs(hakim_netenv::ca::system_bundle().as_deref(), &added)?;
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(roots)
            .disable_verification(opts.insecure)
            .build();
        let build = |proxy: Option<ureq::Proxy>| -> ureq::Agent {
            ureq::Agent::config_builder()
                // Statuses are interpreted by the client, with the registry's message.
                .http_status_as_error(false)
                // Redirects are followed by hand: Authorization must not leak.
                .max_redirects(0)
                .timeout_connect(Some(opts.connect_timeout))
                .timeout_per_read(Some(opts.read_timeout))
                .user_agent(concat!("hakim-convert/", env!("CARGO_PKG_VERSION")))
                // Always set, or ureq would read the proxy variables itself.
                .proxy(proxy)
                .tls_config(tls.clone())
                .build()
                .into()
        };
        let proxy_agent = |var: &str, value: &Option<String>| -> Result<Option<ureq::Agent>> {
            let Some(v) = value else { return Ok(None) };
            if v.split_once("://")
                .is_some_and(|(s, _)| s.to_ascii_lowercase().starts_with("socks"))
            {
                bail!("{var}: SOCKS proxies are not supported; use an HTTP(S) proxy");
            }
            // The value may hold credentials: the error names only the variable.
            let p = ureq::Proxy::new(v)
                .map_err(|_| anyhow::anyhow!("{var} is not a valid proxy URL"))?;
            Ok(Some(build(Some(p))))
        };
        let p = &opts.proxy;
        let https_var = if p.https.is_some() {
            "https_proxy"
        } else {
            "all_proxy"
        };
        let http_var = if p.http.is_some() {
            "http_proxy"
        } else {
            "all_proxy"
        };
        Ok(Agents {
            direct: build(None),
            https_proxy: proxy_agent(https_var, &p.https.clone().or(p.all.clone()))?,
            http_proxy: proxy_agent(http_var, &p.http.clone().or(p.all.clone()))?,
            no_proxy: p.no_proxy.clone(),
        })
    }

    /// The agent for a URL with this scheme, host and port.
    pub fn for_target(&self, https: bool, host: &str, port: u16) -> &ureq::Agent {
        let proxied = if https {
            self.https_proxy.as_ref()
        } else {
            self.http_proxy.as_ref()
        };
        match proxied {
            Some(a)
                if !is_loopback_host(host)
                    && !self
                        .no_proxy
                        .as_deref()
                        .is_some_and(|l| no_proxy_matches(l, host, port)) =>
            {
                a
            }
            _ => &self.direct,
        }
    }
}

/// Whether a request failed because the server's certificate is not trusted
/// (as opposed to the server not speaking TLS at all).
pub fn is_certificate_error(e: &ureq::Error) -> bool {
    // rustls reports handshake failures as an io::Error wrapping its own error.
    let mut source: Option<&(dyn std::error::Error + 'static)> = match e {
        ureq::Error::Rustls(r) => return is_cert(r),
        ureq::Error::Io(io) => Some(io),
        other => Some(other),
    };
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<rustls::Error>() {
            return is_cert(r);
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return is_cert(r);
            }
        }
        source = s.source();
    }
    false
}

fn is_cert(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_env_lowercase_wins() {
        let env = |k: &str| match k {
            "https_proxy" => Some("http://lower:3128".into()),
            "HTTPS_PROXY" => Some("http://upper:3128".into()),
            "NO_PROXY" => Some("ghcr.io".into()),
            "http_proxy" => Some("  ".into()),
            _ => None,
        };
        let p = ProxyEnv::from_lookup(env);
        assert_eq!(p.https.as_deref(), Some("http://lower:3128"));
        assert_eq!(p.http, None);
        assert_eq!(p.no_proxy.as_deref(), Some("ghcr.io"));
    }

    #[test]
    fn empty_ca_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ca.pem");
        std::fs::write(&f, "not a certificate").unwrap();
        let opts = TransportOptions {
            insecure: false,
            ca_certs: vec![f],
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            proxy: ProxyEnv::default(),
            ssl_cert_file: None,
        };
        let err = Agents::new(&opts).err().unwrap();
        assert!(format!("{err:#}").contains("no PEM certificate"));
    }
}
