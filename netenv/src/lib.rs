//! What hakim-convert and hakim-init share, so that neither keeps a copy: how a `no_proxy`
//! list exempts a host and which proxy a URL takes (here), which CAs to trust ([`ca`]), how
//! retries are spaced ([`backoff`]) and how untrusted text reaches a message ([`text`]).
//! Small dependencies only (ureq, which both binaries use anyway, and fastrand), so the
//! static init binary stays small.

use std::net::IpAddr;

pub mod backoff;
pub mod ca;
pub mod text;

pub use ca::SYSTEM_CA_BUNDLES;

/// Whether `host` (as in a URL; IPv6 may be bracketed) on `port` is exempted by a `no_proxy`
/// list. Entries are separated by commas or whitespace and matched case-insensitively:
/// `*` matches everything; `example.com`, `.example.com` and `*.example.com` all match
/// `example.com` and its subdomains (curl's reading); IP addresses match exactly and CIDR
/// blocks (`10.0.0.0/8`, `fd00::/8`) by containment; an entry may end in `:port`
/// (`[::1]:8080` for IPv6) and then matches only that port.
pub fn no_proxy_matches(list: &str, host: &str, port: u16) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let host_ip: Option<IpAddr> = host.parse().ok();
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|e| !e.is_empty())
        .any(|entry| no_proxy_entry_matches(entry, &host, host_ip, port))
}

fn no_proxy_entry_matches(entry: &str, host: &str, host_ip: Option<IpAddr>, port: u16) -> bool {
    if entry == "*" {
        return true;
    }
    let (pattern, entry_port) = split_entry_port(entry);
    if let Some(p) = entry_port {
        if p.parse::<u16>().ok() != Some(port) {
            return false;
        }
    }
    if let Some((net, bits)) = pattern.split_once('/') {
        let (Ok(net), Ok(bits), Some(ip)) = (net.parse::<IpAddr>(), bits.parse::<u32>(), host_ip)
        else {
            return false;
        };
        return cidr_contains(net, bits, ip);
    }
    if let Ok(ip) = pattern.parse::<IpAddr>() {
        return host_ip == Some(ip);
    }
    let domain = pattern
        .trim_start_matches('*')
        .trim_start_matches('.')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if domain.is_empty() {
        return false;
    }
    host == domain
        || host
            .strip_suffix(domain.as_str())
            .is_some_and(|rest| rest.ends_with('.'))
}

/// Splits `host:port`, `[v6]:port`, `[v6]`; a bare IPv6 address (several colons) has no port.
fn split_entry_port(entry: &str) -> (&str, Option<&str>) {
    if let Some(rest) = entry.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((addr, after)) => (addr, after.strip_prefix(':')),
            None => (entry, None),
        };
    }
    match entry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (entry, None),
    }
}

fn cidr_contains(net: IpAddr, bits: u32, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

/// Proxy settings, as found in the environment. Lowercase names win over uppercase, as
/// in curl; an empty value counts as unset. Values are never printed (they may hold
/// credentials).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProxyEnv {
    pub http: Option<String>,
    pub https: Option<String>,
    pub all: Option<String>,
    pub no_proxy: Option<String>,
}

impl ProxyEnv {
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> ProxyEnv {
        let get = |lower: &str, upper: &str| {
            lookup(lower)
                .filter(|v| !v.trim().is_empty())
                .or_else(|| lookup(upper).filter(|v| !v.trim().is_empty()))
                .map(|v| v.trim().to_string())
        };
        ProxyEnv {
            http: get("http_proxy", "HTTP_PROXY"),
            https: get("https_proxy", "HTTPS_PROXY"),
            all: get("all_proxy", "ALL_PROXY"),
            no_proxy: get("no_proxy", "NO_PROXY"),
        }
    }

    pub fn from_env() -> ProxyEnv {
        ProxyEnv::from_lookup(|k| std::env::var(k).ok())
    }

    /// The proxy for a URL of this scheme, host and port (the variable it came from, and
    /// its value), or `None` for a direct connection. `https_proxy` serves https URLs,
    /// `http_proxy` http ones, `all_proxy` both; `no_proxy` exempts hosts.
    pub fn pick(&self, https: bool, host: &str, port: u16) -> Option<(&'static str, &str)> {
        let chosen = if https {
            self.https.as_deref().map(|p| ("https_proxy", p))
        } else {
            self.http.as_deref().map(|p| ("http_proxy", p))
        }
        .or_else(|| self.all.as_deref().map(|p| ("all_proxy", p)))?;
        match &self.no_proxy {
            Some(list) if no_proxy_matches(list, host, port) => None,
            _ => Some(chosen),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_rules() {
        let l = "localhost, .corp.example,*.b.example,10.0.0.0/8,192.168.1.5,[::1]:8080,reg.example:5000";
        assert!(no_proxy_matches(l, "x.corp.example", 443));
        assert!(no_proxy_matches(l, "corp.example", 443));
        assert!(no_proxy_matches(l, "b.example", 443));
        assert!(!no_proxy_matches(l, "notcorp.example", 443));
        assert!(no_proxy_matches(l, "10.2.3.4", 443));
        assert!(!no_proxy_matches(l, "11.2.3.4", 443));
        assert!(no_proxy_matches(l, "192.168.1.5", 80));
        assert!(no_proxy_matches(l, "[::1]", 8080));
        assert!(!no_proxy_matches(l, "[::1]", 8081));
        assert!(no_proxy_matches(l, "reg.example", 5000));
        assert!(!no_proxy_matches(l, "reg.example", 443));
        assert!(no_proxy_matches("*", "anything", 1));
        assert!(!no_proxy_matches("", "anything", 1));
    }
}
