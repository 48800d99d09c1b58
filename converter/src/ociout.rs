//! Writing a Proxmox-importable OCI archive: an uncompressed tar holding exactly
//! `oci-layout`, `blobs/sha256/<hex>` and `index.json` (no `./` prefix, no
//! directory members), one image manifest, OCI media types only.
//!
//! Proxmox (`proxmox-oci`) decompresses every layer several times and applies
//! whiteouts itself, so the default is one flattened layer written straight
//! from pass 2; `keep_layers` copies the source blobs instead where Proxmox can
//! read them (single-member gzip, zstd) and re-encodes the others.
//!
//! A blob's member name is its digest, known only once it is written: its
//! header is reserved, the blob streamed into the archive, and the header filled
//! in afterwards — nothing is staged in a temporary file.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::acceptance::{self, Check, MemberRules, Stream};
use crate::compress::{Encoder, OutputCompression};
use crate::digest::{Digest, HashRead};
use crate::flatten::{self, EmitOptions, EmitStats, Index, NameStyle};
use crate::inject;
use crate::layer::{self, Compression};
use crate::output::{HashWrite, OutputFile};
use crate::registry::{BlobUpload, PushRequest, Reference};
use crate::source::ResolvedImage;
use crate::tarout::TarWriter;

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
const BLOCK: u64 = 512;

pub struct OciOptions {
    /// Layer compression: gzip or zstd.
    pub compression: OutputCompression,
    pub level: u32,
    pub threads: u32,
    pub keep_layers: bool,
    /// Whether hakim-init was injected (sets Entrypoint/Cmd/User/StopSignal).
    pub init_injected: bool,
    /// The tag recorded as `org.opencontainers.image.ref.name`.
    pub tag: String,
    /// `SOURCE_DATE_EPOCH`: member mtimes and the config's `created`.
    pub source_date_epoch: Option<u64>,
}

/// One blob inside the written archive: where its bytes are (for pushing).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlobRef {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    /// Offset of the blob's bytes in the archive file.
    #[serde(skip)]
    pub offset: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct OciArchive {
    pub manifest: BlobRef,
    pub config: BlobRef,
    pub layers: Vec<BlobRef>,
    pub diff_ids: Vec<String>,
    #[serde(skip)]
    pub manifest_json: Vec<u8>,
    pub entries: Option<EmitStats>,
    pub warnings: Vec<String>,
    /// Proxmox's acceptance rules on the layers and config written.
    #[serde(skip)]
    pub checks: Vec<Check>,
}

/// The outer tar, written to a seekable file.
struct Archive<'f> {
    out: BufWriter<OutputFile<'f>>,
    pos: u64,
    mtime: u64,
}

impl<'f> Archive<'f> {
    fn header(name: &str, size: u64, mtime: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).expect("short ASCII member name");
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        h.set_size(size);
        h.set_cksum();
        h
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let pad = ((BLOCK - size % BLOCK) % BLOCK) as usize;
        self.put(&[0u8; BLOCK as usize][..pad])
    }

    /// A member whose bytes are in memory.
    fn member(&mut self, name: &str, bytes: &[u8]) -> io::Result<u64> {
        let h = Self::header(name, bytes.len() as u64, self.mtime);
        self.put(h.as_bytes())?;
        let offset = self.pos;
        self.put(bytes)?;
        self.pad(bytes.len() as u64)?;
        Ok(offset)
    }

    fn blob(&mut self, bytes: &[u8], media_type: &str) -> io::Result<BlobRef> {
        let digest = Digest::of_bytes(bytes);
        let offset = self.member(&format!("blobs/sha256/{}", digest.hex()), bytes)?;
        Ok(BlobRef {
            digest,
            size: bytes.len() as u64,
            media_type: media_type.into(),
            offset,
        })
    }

    /// Streams a blob whose digest is known only at the end: `write` gets the
    /// archive positioned after a reserved header and returns the blob's digest.
    fn streamed_blob(
        &mut self,
        media_type: &str,
        write: impl FnOnce(&mut BufWriter<OutputFile<'f>>) -> Result<Digest>,
    ) -> Result<BlobRef> {
        let header_at = self.pos;
        self.put(&[0u8; BLOCK as usize])?;
        let offset = self.pos;
        let digest = write(&mut self.out)?;
        let end = self.out.stream_position()?;
        let size = end - offset;
        self.pos = end;
        self.pad(size)?;
        let h = Self::header(&format!("blobs/sha256/{}", digest.hex()), size, self.mtime);
        self.out.seek(SeekFrom::Start(header_at))?;
        self.out.write_all(h.as_bytes())?;
        self.out.seek(SeekFrom::Start(self.pos))?;
        Ok(BlobRef {
            digest,
            size,
            media_type: media_type.into(),
            offset,
        })
    }

    fn finish(mut self) -> io::Result<()> {
        self.put(&[0u8; 2 * BLOCK as usize])?;
        self.out.flush()
    }
}

fn layer_media_type(c: OutputCompression) -> Result<&'static str> {
    match c {
        OutputCompression::Gzip => Ok(LAYER_GZIP),
        OutputCompression::Zstd => Ok(LAYER_ZSTD),
        other => bail!(
            "OCI archives hold gzip or zstd layers (Proxmox reads no other); --compression {other:?} is not possible"
        ),
    }
}

/// Compresses what `fill` writes into the archive; returns (blob digest, diff_id).
fn encode_into(
    out: &mut BufWriter<OutputFile<'_>>,
    opts: &OciOptions,
    fill: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<(Digest, Digest)> {
    let blob_hash = HashWrite::new(out);
    let encoder = Encoder::new(opts.compression, opts.level, opts.threads, blob_hash)?;
    let mut diff_hash = BufWriter::with_capacity(1 << 20, HashWrite::new(encoder));
    fill(&mut diff_hash)?;
    let diff = diff_hash
        .into_inner()
        .map_err(|e| e.into_error())
        .context("cannot write the layer")?;
    let (diff_hex, _, encoder) = diff.finish();
    let blob_hash = encoder.finish().context("cannot finish the layer")?;
    let (blob_hex, _, _) = blob_hash.finish();
    let parse = |h: String| -> Digest { format!("sha256:{h}").parse().expect("sha256 hex") };
    Ok((parse(blob_hex), parse(diff_hex)))
}

/// Writes the archive into `file` (positioned at its start).
pub fn write(
    file: OutputFile<'_>,
    image: &ResolvedImage,
    index: &mut Index,
    opts: &OciOptions,
    tick: &mut dyn FnMut(u64) -> io::Result<()>,
) -> Result<OciArchive> {
    let layer_type = layer_media_type(opts.compression)?;
    let mtime = opts.source_date_epoch.unwrap_or(0);
    let mut warnings = Vec::new();
    let mut ar = Archive {
        out: BufWriter::with_capacity(1 << 20, file),
        pos: 0,
        mtime,
    };
    ar.member("oci-layout", OCI_LAYOUT)?;

    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let mut entries = None;
    // Proxmox's acceptance rules on what is written.
    let mut checks = Vec::new();
    if opts.keep_layers {
        // Kept layers are checked as pass 1 read them.
        let layer_rules = std::mem::take(&mut index.layer_rules);
        checks.extend(layer_rules.into_iter().flat_map(|r| r.finish(None)));
        for (desc, stats) in image.layers.iter().zip(&index.layers) {
            let label = desc.label();
            let reusable = desc.digest.is_some()
                && match stats.compression {
                    Compression::Zstd => true,
                    Compression::Gzip => {
                        layer::gzip_is_single_member(image.blobs.open_layer(desc)?)
                            .with_context(|| label.clone())?
                    }
                    _ => false,
                };
            let blob = if reusable {
                let media = if stats.compression == Compression::Gzip {
                    LAYER_GZIP
                } else {
                    LAYER_ZSTD
                };
                let expected = desc.digest.clone().expect("checked above");
                ar.streamed_blob(media, |out| {
                    let mut src = HashRead::new(image.blobs.open_layer(desc)?, desc.size);
                    io::copy(&mut src, out).with_context(|| format!("{label}: copy"))?;
                    let (got, _, _) = src.finish();
                    if got != expected {
                        bail!("{label}: blob changed since it was verified ({got})");
                    }
                    Ok(got)
                })?
            } else {
                warnings.push(format!(
                    "{label}: {:?} layer re-encoded as {:?} for Proxmox",
                    stats.compression, opts.compression
                ));
                ar.streamed_blob(layer_type, |out| {
                    let (digest, diff_id) = encode_into(out, opts, |w| {
                        let mut tar = layer::decompressed(image.blobs.open_layer(desc)?)?;
                        io::copy(&mut tar, w).with_context(|| format!("{label}: re-encode"))?;
                        Ok(())
                    })?;
                    if diff_id != desc.diff_id {
                        bail!(
                            "{label}: re-encoded layer hashes to {diff_id}, not {}",
                            desc.diff_id
                        );
                    }
                    Ok(digest)
                })?
            };
            layers.push(blob);
            diff_ids.push(desc.diff_id.to_string());
        }
    } else {
        let mut diff_id = None;
        let mut emitted = None;
        let blob = ar.streamed_blob(layer_type, |out| {
            let (digest, diff) = encode_into(out, opts, |w| {
                let mut tar = TarWriter::new(w);
                tar.check_with(MemberRules::new(Stream::OciLayer(1)));
                let (stats, warns) = flatten::emit(
                    image,
                    index,
                    &EmitOptions {
                        clamp_mtime: opts.source_date_epoch,
                        names: NameStyle::Layer,
                    },
                    &mut tar,
                    tick,
                )?;
                let rules = tar.take_rules().expect("rules were given");
                tar.finish().context("cannot write the layer")?;
                emitted = Some((stats, warns, rules));
                Ok(())
            })?;
            diff_id = Some(diff);
            Ok(digest)
        })?;
        let (stats, warns, rules) = emitted.expect("emit ran");
        warnings.extend(warns);
        checks.extend(rules.finish(None));
        entries = Some(stats);
        layers.push(blob);
        diff_ids.push(diff_id.expect("layer written").to_string());
    }

    let config_json = oci_config(image, &diff_ids, opts, &mut warnings)?;
    checks.extend(acceptance::config_checks(&serde_json::from_slice(
        &config_json,
    )?));
    let config = ar.blob(&config_json, CONFIG_TYPE)?;
    let manifest_json = manifest(image, &config, &layers)?;
    let manifest_ref = ar.blob(&manifest_json, MANIFEST_TYPE)?;
    let index_json = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_TYPE,
            "digest": manifest_ref.digest.to_string(),
            "size": manifest_ref.size,
            "annotations": {"org.opencontainers.image.ref.name": opts.tag},
        }],
    }))?;
    ar.member("index.json", &index_json)?;
    ar.finish().context("cannot write the archive")?;
    Ok(OciArchive {
        manifest: manifest_ref,
        config,
        layers,
        diff_ids,
        manifest_json,
        entries,
        warnings,
        checks,
    })
}

fn manifest(image: &ResolvedImage, config: &BlobRef, layers: &[BlobRef]) -> Result<Vec<u8>> {
    let mut annotations = Map::new();
    if let Some(d) = &image.manifest_digest {
        annotations.insert(
            "org.opencontainers.image.base.digest".into(),
            json!(d.to_string()),
        );
    }
    let base = inject::portable_reference(&image.reference);
    annotations.insert("org.opencontainers.image.base.name".into(), json!(base));
    let layer_descs: Vec<Value> = layers
        .iter()
        .map(|l| json!({"mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.size}))
        .collect();
    Ok(serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config.digest.to_string(), "size": config.size},
        "layers": layer_descs,
        "annotations": annotations,
    }))?)
}

/// Fields of the runtime `config` the OCI image spec defines; Docker-only ones
/// (Hostname, AttachStdin, …) are dropped, as are nulls.
const CONFIG_KEYS: &[&str] = &[
    "User",
    "ExposedPorts",
    "Env",
    "Entrypoint",
    "Cmd",
    "Volumes",
    "WorkingDir",
    "Labels",
    "StopSignal",
    "ArgsEscaped",
];

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (civil-from-days, proleptic Gregorian).
pub fn rfc3339(epoch: u64) -> String {
    let days = (epoch / 86400) as i64;
    let secs = epoch % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// The image config Proxmox reads: `architecture`, `os`, `rootfs.diff_ids`,
/// `history` (one entry per layer), and the runtime config — rewritten to start
/// hakim-init when it was injected.
pub fn oci_config(
    image: &ResolvedImage,
    diff_ids: &[String],
    opts: &OciOptions,
    warnings: &mut Vec<String>,
) -> Result<Vec<u8>> {
    let source: Value =
        serde_json::from_slice(&image.config_json).context("image config is not JSON")?;
    let created = match opts.source_date_epoch {
        Some(t) => json!(rfc3339(t)),
        None => source.get("created").cloned().unwrap_or(Value::Null),
    };
    let mut runtime = Map::new();
    if let Some(Value::Object(c)) = source.get("config") {
        for key in CONFIG_KEYS {
            match c.get(*key) {
                None | Some(Value::Null) => {}
                Some(v) => {
                    runtime.insert((*key).into(), v.clone());
                }
            }
        }
    }
    if opts.init_injected {
        runtime.insert("Entrypoint".into(), json!([inject::INIT_PATH]));
        runtime.insert("Cmd".into(), json!([]));
        runtime.insert("StopSignal".into(), json!("SIGTERM"));
        if let Some(Value::String(user)) = runtime.remove("User") {
            if !matches!(user.as_str(), "" | "root" | "0" | "0:0" | "root:root") {
                warnings.push(format!(
                    "the image's User '{user}' was dropped: Proxmox would run the init as that user; \
                     hakim-init runs as root and starts the agent as CODER_USER"
                ));
            }
        }
        runtime.remove("ArgsEscaped");
    }

    let source_history: Vec<Value> = source
        .get("history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let non_empty = source_history
        .iter()
        .filter(|h| h.get("empty_layer").and_then(Value::as_bool) != Some(true))
        .count();
    let reference = inject::portable_reference(&image.reference);
    let history: Vec<Value> = if opts.keep_layers {
        let source_layers = diff_ids.len() - usize::from(opts.init_injected);
        let mut h = if non_empty == source_layers {
            source_history
        } else {
            (0..source_layers)
                .map(|i| json!({"created_by": format!("layer {} of {reference}", i + 1)}))
                .collect()
        };
        if opts.init_injected {
            h.push(json!({"created": created, "created_by": "hakim-convert: inject hakim-init"}));
        }
        h
    } else {
        let what = if opts.init_injected {
            "flattened, hakim-init injected"
        } else {
            "flattened"
        };
        vec![json!({
            "created": created,
            "created_by": format!("hakim-convert: {reference}, {} layers {what}", image.layers.len() - usize::from(opts.init_injected)),
        })]
    };
    let history: Vec<Value> = history
        .into_iter()
        .map(|mut h| {
            if let Value::Object(m) = &mut h {
                m.retain(|_, v| !v.is_null());
            }
            h
        })
        .collect();

    let mut config = Map::new();
    if !created.is_null() {
        config.insert("created".into(), created);
    }
    if let Some(a) = source.get("author").filter(|a| !a.is_null()) {
        config.insert("author".into(), a.clone());
    }
    config.insert("architecture".into(), json!(image.platform.architecture));
    config.insert("os".into(), json!(image.platform.os));
    if let Some(v) = &image.platform.variant {
        config.insert("variant".into(), json!(v));
    }
    config.insert("config".into(), Value::Object(runtime));
    config.insert(
        "rootfs".into(),
        json!({"type": "layers", "diff_ids": diff_ids}),
    );
    config.insert("history".into(), Value::Array(history));
    Ok(serde_json::to_vec(&Value::Object(config))?)
}

impl OciArchive {
    /// What `--push` uploads of this archive, written to `path`: the manifest
    /// from memory, the config and layers read at their known offsets (the
    /// archive is not scanned again).
    pub fn push_request(&self, path: &Path, target: Reference) -> PushRequest {
        let mut blobs: Vec<BlobUpload> = Vec::new();
        for blob in std::iter::once(&self.config).chain(&self.layers) {
            // Kept layers may repeat a blob; it is uploaded once.
            if blobs.iter().any(|b| b.digest == blob.digest) {
                continue;
            }
            let (path, blob) = (path.to_path_buf(), blob.clone());
            blobs.push(BlobUpload {
                digest: blob.digest.clone(),
                size: blob.size,
                open: Box::new(move || open_blob(&path, &blob)),
            });
        }
        PushRequest {
            target,
            manifest: self.manifest_json.clone(),
            manifest_media_type: self.manifest.media_type.clone(),
            blobs,
            mount_from: None,
        }
    }
}

/// Reads a blob back from a written archive.
fn open_blob(path: &Path, blob: &BlobRef) -> Result<Box<dyn Read + Send>> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    f.seek(SeekFrom::Start(blob.offset))?;
    Ok(Box::new(f.take(blob.size)))
}

/// `hakim-<variant>_<tag>.tar`, the name Proxmox's `oci-registry-pull` gives.
pub fn archive_name(stem: &str, tag: &str) -> Result<String> {
    let tag = crate::output::sanitize(tag);
    if tag.is_empty() {
        return Err(anyhow!("empty tag"));
    }
    Ok(format!("{stem}_{tag}.tar"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn push_request_reads_each_blob_once_where_it_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        std::fs::write(&path, b"xx{}xxlayerxx").unwrap();
        let blob = |bytes: &[u8], offset: u64, media_type: &str| BlobRef {
            digest: Digest::of_bytes(bytes),
            size: bytes.len() as u64,
            media_type: media_type.into(),
            offset,
        };
        let layer = blob(b"layer", 6, LAYER_GZIP);
        let archive = OciArchive {
            manifest: blob(b"m", 0, MANIFEST_TYPE),
            config: blob(b"{}", 2, CONFIG_TYPE),
            layers: vec![layer.clone(), layer],
            diff_ids: Vec::new(),
            manifest_json: b"m".to_vec(),
            entries: None,
            warnings: Vec::new(),
            checks: Vec::new(),
        };
        let target = Reference::parse("127.0.0.1:5000/a:t").unwrap();
        let request = archive.push_request(&path, target);
        assert_eq!(request.manifest, b"m");
        assert_eq!(request.manifest_media_type, MANIFEST_TYPE);
        let read: Vec<Vec<u8>> = request
            .blobs
            .iter()
            .map(|b| {
                let mut bytes = Vec::new();
                (b.open)().unwrap().read_to_end(&mut bytes).unwrap();
                assert_eq!(Digest::of_bytes(&bytes), b.digest);
                bytes
            })
            .collect();
        // Config first; a layer the manifest names twice is sent once.
        assert_eq!(read, [b"{}".to_vec(), b"layer".to_vec()]);
    }

    #[test]
    fn archive_names() {
        assert_eq!(
            archive_name("hakim-js", "latest").unwrap(),
            "hakim-js_latest.tar"
        );
        assert_eq!(
            archive_name("hakim-js", "v1/2").unwrap(),
            "hakim-js_v1-2.tar"
        );
    }
}
