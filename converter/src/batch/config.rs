//! What a batch converts: the variants of one image family and the artifacts wanted
//! for each, from a small TOML file (`ci/batch.toml`) and/or command-line flags.

use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde::Deserialize;

use crate::compress::OutputCompression;
use crate::source::Platform;

/// The kinds of artifact a batch can produce: rootfs templates (one per compression)
/// and Proxmox-importable OCI archives (gzip layers).
pub use crate::convert::OutputFormat as Format;

/// The TOML file, every key optional (flags fill or override them).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub namespace: Option<String>,
    pub prefix: Option<String>,
    pub variants: Option<Vec<String>>,
    pub tag: Option<String>,
    pub platform: Option<String>,
    pub formats: Option<Vec<String>>,
    pub compression: Option<Vec<String>>,
    pub level: Option<u32>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}: not a batch config", path.display()))
    }
}

/// The resolved plan: `NAMESPACE/PREFIX<variant>:TAG` for every variant, each turned
/// into every [`Output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    /// Registry and owner, e.g. `ghcr.io/shekohex`.
    pub namespace: String,
    /// Repository name before the variant (`hakim-`).
    pub prefix: String,
    pub variants: Vec<String>,
    pub tag: String,
    pub platform: Option<Platform>,
    pub outputs: Vec<Output>,
    pub level: Option<u32>,
}

/// One artifact per variant: a format and its compression (of the whole rootfs
/// template, or of the OCI archive's layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    pub format: Format,
    pub compression: OutputCompression,
}

/// Command-line values; each one given replaces the file's.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub namespace: Option<String>,
    pub prefix: Option<String>,
    pub variants: Vec<String>,
    pub tag: Option<String>,
    pub platform: Option<Platform>,
    pub formats: Vec<Format>,
    pub compression: Vec<OutputCompression>,
    pub level: Option<u32>,
}

fn parse_enum<T: ValueEnum>(what: &str, value: &str) -> Result<T> {
    T::from_str(value, true).map_err(|_| {
        let known: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        anyhow::anyhow!("unknown {what} '{value}' (one of: {})", known.join(", "))
    })
}

/// A variant becomes part of a repository name and of file names.
fn check_variant(v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
        && v.as_bytes()[0].is_ascii_alphanumeric();
    if !ok {
        bail!("variant '{v}': use lowercase letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.format {
            Format::Rootfs => write!(f, "rootfs{}", self.compression.extension()),
            Format::OciArchive => write!(f, "oci-archive"),
        }
    }
}

impl BatchConfig {
    /// Merges the file (if any) and the flags; checks the result.
    pub fn new(file: Option<ConfigFile>, flags: Overrides) -> Result<BatchConfig> {
        let file = file.unwrap_or_default();
        let namespace = flags
            .namespace
            .or(file.namespace)
            .context("no namespace: give --namespace or `namespace` in the config file")?;
        let namespace = namespace.trim_end_matches('/').to_string();
        let variants = if flags.variants.is_empty() {
            file.variants.unwrap_or_default()
        } else {
            flags.variants
        };
        if variants.is_empty() {
            bail!("no variants: give --variant or `variants` in the config file");
        }
        let mut seen = std::collections::HashSet::new();
        for v in &variants {
            check_variant(v)?;
            if !seen.insert(v) {
                bail!("variant '{v}' is listed twice");
            }
        }
        let platform = match (flags.platform, file.platform) {
            (Some(p), _) => Some(p),
            (None, Some(p)) => Some(p.parse().context("platform in the config file")?),
            (None, None) => None,
        };
        let formats = if flags.formats.is_empty() {
            file.formats
                .unwrap_or_else(|| vec!["rootfs".into()])
                .iter()
                .map(|f| parse_enum::<Format>("format", f))
                .collect::<Result<Vec<_>>>()?
        } else {
            flags.formats
        };
        let compression = if flags.compression.is_empty() {
            file.compression
                .unwrap_or_else(|| vec!["xz".into()])
                .iter()
                .map(|c| parse_enum::<OutputCompression>("compression", c))
                .collect::<Result<Vec<_>>>()?
        } else {
            flags.compression
        };
        let mut outputs = Vec::new();
        for format in &formats {
            match format {
                Format::Rootfs => {
                    for c in &compression {
                        outputs.push(Output {
                            format: *format,
                            compression: *c,
                        });
                    }
                }
                Format::OciArchive => outputs.push(Output {
                    format: *format,
                    compression: format.default_compression(),
                }),
            }
        }
        if (1..outputs.len()).any(|i| outputs[..i].contains(&outputs[i])) {
            bail!("a format or compression is listed twice");
        }
        if outputs.is_empty() {
            bail!("no outputs: give at least one format and compression");
        }
        Ok(BatchConfig {
            namespace,
            prefix: flags
                .prefix
                .or(file.prefix)
                .unwrap_or_else(|| "hakim-".into()),
            variants,
            tag: flags.tag.or(file.tag).unwrap_or_else(|| "latest".into()),
            platform,
            outputs,
            level: flags.level.or(file.level),
        })
    }

    /// `NAMESPACE/PREFIX<variant>`
    pub fn repository(&self, variant: &str) -> String {
        format!("{}/{}{variant}", self.namespace, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> ConfigFile {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn file_then_flags() {
        let f = file(
            r#"
namespace = "ghcr.io/shekohex/"
variants = ["base", "php"]
tag = "v1"
platform = "linux/amd64"
formats = ["rootfs"]
compression = ["zstd", "xz"]
"#,
        );
        let c = BatchConfig::new(Some(f), Overrides::default()).unwrap();
        assert_eq!(c.namespace, "ghcr.io/shekohex");
        assert_eq!(c.repository("php"), "ghcr.io/shekohex/hakim-php");
        assert_eq!(c.tag, "v1");
        assert_eq!(c.platform, Some("linux/amd64".parse().unwrap()));
        assert_eq!(
            c.outputs.iter().map(|o| o.compression).collect::<Vec<_>>(),
            [OutputCompression::Zstd, OutputCompression::Xz]
        );
        let c = BatchConfig::new(
            Some(file("namespace = \"a.io/x\"\nvariants = [\"base\"]")),
            Overrides {
                variants: vec!["js".into()],
                compression: vec![OutputCompression::Gzip],
                tag: Some("t".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(c.variants, ["js"]);
        assert_eq!(c.tag, "t");
        assert_eq!(c.outputs.len(), 1);
        assert_eq!(c.outputs[0].compression, OutputCompression::Gzip);
    }

    #[test]
    fn rejects_bad_configs() {
        let err = |f: &str, o: Overrides| {
            format!("{:#}", BatchConfig::new(Some(file(f)), o).unwrap_err())
        };
        assert!(err("variants = [\"a\"]", Overrides::default()).contains("namespace"));
        assert!(err("namespace = \"a.io/x\"", Overrides::default()).contains("variants"));
        assert!(err(
            "namespace = \"a.io/x\"\nvariants = [\"a\", \"a\"]",
            Overrides::default()
        )
        .contains("twice"));
        assert!(err(
            "namespace = \"a.io/x\"\nvariants = [\"../x\"]",
            Overrides::default()
        )
        .contains("variant"));
        assert!(err(
            "namespace = \"a.io/x\"\nvariants = [\"a\"]\ncompression = [\"lz4\"]",
            Overrides::default()
        )
        .contains("lz4"));
        assert!(toml::from_str::<ConfigFile>("nope = 1").is_err());
    }

    #[test]
    fn checked_in_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/batch.toml");
        let c =
            BatchConfig::new(Some(ConfigFile::load(&path).unwrap()), Overrides::default()).unwrap();
        assert_eq!(c.namespace, "ghcr.io/shekohex");
        assert_eq!(
            c.variants,
            ["base", "php", "dotnet", "js", "rust", "elixir", "android"]
        );
    }
}
