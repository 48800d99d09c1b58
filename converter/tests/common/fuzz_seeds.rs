//! Every fixture doubles as a fuzz seed: with `HAKIM_FUZZ_SEEDS=DIR` set (see
//! `ci/fuzz-seeds.sh`), the layer stacks tests build are written to
//! `DIR/flatten/`, the layouts they convert to `DIR/manifest/` and the
//! artifacts they verify to `DIR/verify/`, in the input formats of the fuzz
//! targets (`fuzz/src/image.rs`, `fuzz/fuzz_targets/manifest.rs`,
//! `fuzz/fuzz_targets/verify.rs`). Without the variable nothing happens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hakim_convert::digest::Digest;
use hakim_convert::sample::SampleLayer;

/// `fuzz/src/lib.rs`'s separator between the parts of an input.
const SEP: &[u8] = b"%%HAKIM%%\n";

fn seed_dir(target: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("HAKIM_FUZZ_SEEDS")?).join(target);
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

/// Named by content, as libFuzzer names corpus files: duplicates collapse.
fn save(target: &str, bytes: &[u8]) {
    if let Some(dir) = seed_dir(target) {
        let _ = std::fs::write(dir.join(Digest::of_bytes(bytes).hex()), bytes);
    }
}

/// A flag byte, then per layer its compression byte and tar.
pub fn layers(layers: &[SampleLayer]) {
    if seed_dir("flatten").is_none() {
        return;
    }
    let mut seed = vec![0u8];
    for (i, l) in layers.iter().enumerate() {
        if i > 0 {
            seed.extend_from_slice(SEP);
        }
        let how = if l.media_type.ends_with("+gzip") {
            1
        } else if l.media_type.ends_with("+zstd") {
            2
        } else {
            0
        };
        seed.push(how);
        seed.extend_from_slice(&l.tar);
    }
    save("flatten", &seed);
}

/// An artifact as `verify` reads it (flag bit 3: the bytes as they are). Large
/// ones slow every execution down without adding paths.
pub fn artifact(bytes: &[u8]) {
    if bytes.len() <= 64 << 10 {
        save("verify", &[&[8u8][..], bytes].concat());
    }
}

/// `index.json`, then every JSON document it reaches (breadth first), with
/// digests and sizes of later documents written as `<Dn>`/`<Sn>`.
pub fn layout(dir: &Path) {
    if seed_dir("manifest").is_none() {
        return;
    }
    let Some(index) = read_at_most(&dir.join("index.json"), 4 << 20) else {
        return;
    };
    let mut docs: Vec<Vec<u8>> = vec![index];
    let mut numbers: BTreeMap<String, usize> = BTreeMap::new();
    let mut i = 0;
    while i < docs.len() && docs.len() < 10 {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&docs[i]) else {
            break;
        };
        let mut found = Vec::new();
        collect_digests(&v, &mut found);
        for d in found {
            if numbers.contains_key(&d) {
                continue;
            }
            let Some(hex) = d.strip_prefix("sha256:") else {
                continue;
            };
            // Bounded: a test may point a blob at /dev/zero (a blob that never
            // ends); JSON documents worth seeding are small.
            let Some(bytes) = read_at_most(&dir.join("blobs/sha256").join(hex), 1 << 20) else {
                continue;
            };
            if serde_json::from_slice::<serde_json::Value>(&bytes).is_ok() {
                numbers.insert(d, docs.len());
                docs.push(bytes);
            }
        }
        i += 1;
    }
    let mut seed = vec![0u8];
    for (n, doc) in docs.iter().enumerate() {
        if n > 0 {
            seed.extend_from_slice(SEP);
        }
        let mut v: serde_json::Value = serde_json::from_slice(doc).unwrap();
        template(&mut v, &numbers, docs.as_slice());
        let mut text = serde_json::to_string(&v).unwrap();
        for k in numbers.values() {
            text = text.replace(&format!("\"<S{k}>\""), &format!("<S{k}>"));
        }
        seed.extend_from_slice(text.as_bytes());
    }
    save("manifest", &seed);
}

/// The file's bytes when it holds at most `max` of them.
fn read_at_most(path: &Path, max: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(max + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    (bytes.len() as u64 <= max).then_some(bytes)
}

fn collect_digests(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(d) = m.get("digest").and_then(|d| d.as_str()) {
                out.push(d.to_string());
            }
            m.values().for_each(|x| collect_digests(x, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_digests(x, out)),
        _ => {}
    }
}

fn template(v: &mut serde_json::Value, numbers: &BTreeMap<String, usize>, docs: &[Vec<u8>]) {
    match v {
        serde_json::Value::Object(m) => {
            let n = m
                .get("digest")
                .and_then(|d| d.as_str())
                .and_then(|d| numbers.get(d))
                .copied();
            if let Some(n) = n {
                if m.get("size").and_then(|s| s.as_u64()) == Some(docs[n].len() as u64) {
                    m.insert("digest".into(), format!("<D{n}>").into());
                    m.insert("size".into(), format!("<S{n}>").into());
                }
            }
            m.values_mut().for_each(|x| template(x, numbers, docs));
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| template(x, numbers, docs)),
        _ => {}
    }
}
