//! Agent-native artifacts built from crafted images: hakim-init injection in
//! both formats, the OCI archive's structure and config, `--keep-layers`, and
//! `verify` passing on everything we write. (Real images, skopeo and umoci are
//! exercised in `tests/tests/agent_native.rs`.)

mod common;

use std::io::{Read, Write};
use std::path::Path;

use common::{fake_init, listing, rewrite_image, Fixture};
use hakim_convert::compress::OutputCompression;
use hakim_convert::convert::{convert, ConvertOptions, OutputFormat, Summary};
use hakim_convert::inject::InjectOptions;
use hakim_convert::sample::{BlobCompression, LayerBuilder, SampleLayer};
use hakim_convert::tarout::OutKind;
use hakim_convert::verify::{self, Status};
use serde_json::Value;

/// A merged-/usr Debian-like image with systemd's /sbin/init, SSH host keys,
/// a resolv.conf symlink, a machine-id, Env and a User.
fn systemd_image() -> Fixture {
    let base = LayerBuilder::new()
        .dir("usr/", 0o755)
        .dir("usr/sbin/", 0o755)
        .dir("usr/lib/", 0o755)
        .dir("usr/lib/systemd/", 0o755)
        .symlink("sbin", "usr/sbin")
        .symlink("bin", "usr/bin")
        .dir("usr/bin/", 0o755)
        .file_mode("usr/lib/systemd/systemd", "ELF systemd", 0o755)
        .symlink("usr/sbin/init", "../lib/systemd/systemd")
        .dir("etc/", 0o755)
        .file(
            "usr/lib/os-release",
            "ID=debian\nVERSION_CODENAME=trixie\nVERSION_ID=\"13\"\n",
        )
        .symlink("etc/os-release", "../usr/lib/os-release")
        .file("etc/machine-id", "0123456789abcdef0123456789abcdef\n")
        .symlink("etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf")
        .dir("etc/ssh/", 0o755)
        .file("etc/ssh/sshd_config", "PermitRootLogin no\n")
        .file_mode("etc/ssh/ssh_host_ed25519_key", "PRIVATE", 0o600)
        .file("etc/ssh/ssh_host_ed25519_key.pub", "PUBLIC")
        // A key name that is not UTF-8 must be whited out under its own bytes.
        .entry(
            b"etc/ssh/ssh_host_\xff_key",
            OutKind::File,
            0o600,
            None,
            b"PRIVATE",
            &[],
        )
        .finish();
    let top = LayerBuilder::new()
        .file_mode("usr/bin/tool", "#!/bin/sh\n", 0o755)
        .finish();
    let f = Fixture::new(&[
        SampleLayer::new(base, BlobCompression::Gzip),
        SampleLayer::new(top, BlobCompression::Zstd),
    ]);
    rewrite_image(
        &f.layout(),
        |c| {
            c["config"] = serde_json::json!({
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "HAKIM_VARIANT=base"],
                "Entrypoint": ["/usr/local/bin/hakim-entrypoint"],
                "Cmd": ["bash"],
                "User": "coder",
                "WorkingDir": "/home/coder",
                "Hostname": "docker-only-field",
            });
            c["created"] = "2026-01-02T03:04:05Z".into();
            c["history"] = serde_json::json!([
                {"created_by": "debootstrap"},
                {"created_by": "ENV PATH", "empty_layer": true},
                {"created_by": "COPY tool"},
            ]);
        },
        |_| {},
    );
    f
}

fn options(f: &Fixture, format: OutputFormat, init: Option<&Path>) -> ConvertOptions {
    ConvertOptions {
        format,
        compression: format.default_compression(),
        threads: Some(1),
        variant: Some("base".into()),
        inject: init.map(|p| InjectOptions {
            init_binary: p.to_path_buf(),
            services_dir: None,
            keep_ssh_host_keys: false,
        }),
        ..ConvertOptions::new(format!("oci:{}:1", f.layout().display()), f.out())
    }
}

fn decompress(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let f = std::fs::File::open(path).unwrap();
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        liblzma::read::XzDecoder::new(f)
            .read_to_end(&mut out)
            .unwrap();
    } else if name.ends_with(".gz") {
        flate2::read::GzDecoder::new(f)
            .read_to_end(&mut out)
            .unwrap();
    } else {
        std::io::BufReader::new(f).read_to_end(&mut out).unwrap();
    }
    out
}

fn list_bytes(tar: &[u8], dir: &Path) -> Vec<String> {
    let p = dir.join("listing.tar");
    std::fs::write(&p, tar).unwrap();
    listing(&p)
}

fn assert_verified(path: &Path) -> verify::Report {
    common::fuzz_seeds::artifact(&std::fs::read(path).unwrap());
    let report = verify::verify(path).unwrap();
    let failed: Vec<_> = report.failures().collect();
    assert!(failed.is_empty(), "{}: {failed:#?}", path.display());
    report
}

/// Members of an OCI archive by name.
fn archive_members(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut ar = tar::Archive::new(std::fs::File::open(path).unwrap());
    ar.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (name, data)
        })
        .collect()
}

fn blob<'a>(members: &'a [(String, Vec<u8>)], digest: &str) -> &'a [u8] {
    let name = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    &members
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .1
}

struct Oci {
    manifest: Value,
    config: Value,
    members: Vec<(String, Vec<u8>)>,
}

fn read_oci(path: &Path) -> Oci {
    let members = archive_members(path);
    let index: Value = serde_json::from_slice(
        &members
            .iter()
            .find(|(n, _)| n == "index.json")
            .expect("index.json")
            .1,
    )
    .unwrap();
    let manifest: Value = serde_json::from_slice(blob(
        &members,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let config: Value = serde_json::from_slice(blob(
        &members,
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    Oci {
        manifest,
        config,
        members,
    }
}

fn convert_ok(o: &ConvertOptions) -> Summary {
    let s = convert(o).unwrap_or_else(|e| panic!("{e:#}"));
    common::assert_convert_matches_verify(&s);
    s
}

#[test]
fn rootfs_injection_replaces_systemd_and_scrubs_host_state() {
    let f = systemd_image();
    let init = fake_init(f.dir.path(), 62, false);
    let s = convert_ok(&options(&f, OutputFormat::Rootfs, Some(&init)));
    assert_eq!(
        s.file_name, "hakim-base-trixie-amd64.tar.xz",
        "rootfs naming is unchanged by injection"
    );
    let report = assert_verified(&s.artifact);
    let init_check = report
        .checks
        .iter()
        .find(|c| c.rule.starts_with("/sbin/init"))
        .unwrap();
    assert_eq!(init_check.detail, "/usr/local/sbin/hakim-init");

    let l = list_bytes(&decompress(&s.artifact), f.dir.path());
    let has = |line: &str| l.iter().any(|m| m == line);
    // /sbin stays the merged-/usr symlink; the init link lands in usr/sbin.
    assert!(has("./sbin l -> usr/sbin"), "{l:#?}");
    assert!(
        has("./usr/sbin/init l -> /usr/local/sbin/hakim-init"),
        "{l:#?}"
    );
    assert!(!l.iter().any(|m| m.starts_with("./sbin/")), "{l:#?}");
    assert!(l
        .iter()
        .any(|m| m.starts_with("./usr/local/sbin/hakim-init f 755 0:0")));
    // Parents the image lacked are real members, not implicit ones.
    assert!(has("./usr/local/ d 755 0:0") && has("./usr/local/sbin/ d 755 0:0"));
    assert!(has("./etc/machine-id f 444 0:0 ="), "{l:#?}");
    assert!(has("./etc/resolv.conf f 644 0:0 ="), "{l:#?}");
    assert!(has("./etc/ssh/sshd_config f 644 0:0 =PermitRootLogin no\n"));
    assert!(!l.iter().any(|m| m.contains("ssh_host_")), "{l:#?}");
    assert!(has("./usr/lib/systemd/systemd f 755 0:0 =ELF systemd"));
    assert!(has(
        "./etc/hakim/image.env f 644 0:0 =# The source image's Env, written by hakim-convert. hakim-init uses these as\n\
         # defaults; the container's own environment overrides them.\n\
         PATH=/usr/local/bin:/usr/bin:/bin\nLANG=C.UTF-8\nHAKIM_VARIANT=base\n"
    ));
    let json_line = l
        .iter()
        .find(|m| m.starts_with("./etc/hakim/image.json f 644 0:0 ="))
        .unwrap();
    let doc: Value = serde_json::from_str(json_line.split_once(" =").unwrap().1).unwrap();
    assert_eq!(doc["config"]["User"], "coder");
    assert_eq!(doc["config"]["Cmd"], serde_json::json!(["bash"]));
    assert_eq!(doc["config"]["WorkingDir"], "/home/coder");
    assert_eq!(
        doc["source"]["reference"], "oci:layout:1",
        "no machine path"
    );
    assert!(doc["source"]["manifest_digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert!(s
        .injected
        .contains(&"-/etc/ssh/ssh_host_ed25519_key".to_string()));
    assert!(
        s.injected
            .contains(&"-/etc/ssh/ssh_host_\\xff_key".to_string()),
        "{:?}",
        s.injected
    );

    // --keep-ssh-host-keys keeps them.
    let mut o = options(&f, OutputFormat::Rootfs, Some(&init));
    o.inject.as_mut().unwrap().keep_ssh_host_keys = true;
    o.name = Some("keep".into());
    let s = convert_ok(&o);
    let l = list_bytes(&decompress(&s.artifact), f.dir.path());
    assert!(l
        .iter()
        .any(|m| m.starts_with("./etc/ssh/ssh_host_ed25519_key f 600")));
}

#[test]
fn oci_archive_is_what_proxmox_reads() {
    let f = systemd_image();
    let init = fake_init(f.dir.path(), 62, false);
    let mut o = options(&f, OutputFormat::OciArchive, Some(&init));
    o.tag = Some("latest".into());
    o.source_date_epoch = Some(1_750_000_000);
    let s = convert_ok(&o);
    assert_eq!(s.file_name, "hakim-base_latest.tar");
    assert!(
        s.warnings.iter().any(|w| w.contains("User 'coder'")),
        "dropping User is reported: {:?}",
        s.warnings
    );
    assert_verified(&s.artifact);

    let oci = read_oci(&s.artifact);
    let names: Vec<&str> = oci.members.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"oci-layout"));
    assert_eq!(names.last(), Some(&"index.json"));
    assert_eq!(
        names.len(),
        5,
        "layout, layer, config, manifest, index: {names:?}"
    );
    assert!(names[1..4].iter().all(|n| n.starts_with("blobs/sha256/")));

    let c = &oci.config;
    assert_eq!(c["architecture"], "amd64");
    assert_eq!(c["os"], "linux");
    assert_eq!(
        c["created"], "2025-06-15T15:06:40Z",
        "SOURCE_DATE_EPOCH wins"
    );
    let rc = &c["config"];
    assert_eq!(
        rc["Entrypoint"],
        serde_json::json!(["/usr/local/sbin/hakim-init"])
    );
    assert_eq!(rc["Cmd"], serde_json::json!([]));
    assert_eq!(rc["StopSignal"], "SIGTERM");
    assert!(rc.get("User").is_none());
    assert!(rc.get("Hostname").is_none(), "Docker-only fields dropped");
    assert_eq!(
        rc["Env"],
        serde_json::json!([
            "PATH=/usr/local/bin:/usr/bin:/bin",
            "LANG=C.UTF-8",
            "HAKIM_VARIANT=base"
        ])
    );
    assert_eq!(rc["WorkingDir"], "/home/coder");
    assert_eq!(c["history"].as_array().unwrap().len(), 1);

    let layers = oci.manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer = blob(&oci.members, layers[0]["digest"].as_str().unwrap());
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(layer)
        .read_to_end(&mut tar)
        .unwrap();
    assert_eq!(
        c["rootfs"]["diff_ids"][0].as_str().unwrap(),
        hakim_convert::digest::Digest::of_bytes(&tar).to_string()
    );
    let l = list_bytes(&tar, f.dir.path());
    assert!(
        l.iter()
            .all(|m| !m.starts_with("./") && !m.starts_with('/')),
        "layer names are plain relative names: {l:#?}"
    );
    assert!(l
        .iter()
        .any(|m| m == "usr/sbin/init l -> /usr/local/sbin/hakim-init"));
    assert!(l
        .iter()
        .any(|m| m.starts_with("usr/local/sbin/hakim-init f 755 0:0")));
    assert!(
        !l.iter().any(|m| m.contains(".wh.")),
        "no whiteouts: {l:#?}"
    );

    // Same input, same bytes (the archive and its sums line).
    let again = convert_ok(&ConvertOptions {
        threads: Some(2),
        output_dir: f.dir.path().join("out2"),
        ..o
    });
    assert_eq!(again.sha256, s.sha256);
}

#[test]
fn keep_layers_reuses_what_proxmox_can_read() {
    // gzip (single member) and zstd layers are copied; a plain layer and a
    // multi-member gzip layer are re-encoded; the injected layer goes on top.
    let l1 = LayerBuilder::new()
        .file("etc/os-release", "ID=debian\nVERSION_CODENAME=trixie\n")
        .finish();
    let l2 = LayerBuilder::new().file("a", "zstd layer").finish();
    let l3 = LayerBuilder::new().file("b", "plain layer").finish();
    let l4 = LayerBuilder::new().file("c", "two gzip members").finish();
    let mut multi = Vec::new();
    let (head, tail) = l4.split_at(512);
    for part in [head, tail] {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(part).unwrap();
        multi.extend(e.finish().unwrap());
    }
    let mut l4s = SampleLayer::new(l4, BlobCompression::Gzip);
    l4s.blob = multi;
    let layers = [
        SampleLayer::new(l1, BlobCompression::Gzip),
        SampleLayer::new(l2, BlobCompression::Zstd),
        SampleLayer::new(l3, BlobCompression::Plain),
        l4s,
    ];
    let f = Fixture::new(&layers);
    let source = common::manifest_of(&f.layout());
    let init = fake_init(f.dir.path(), 62, false);
    let mut o = options(&f, OutputFormat::OciArchive, Some(&init));
    o.keep_layers = true;
    let s = convert_ok(&o);
    assert_verified(&s.artifact);
    let oci = read_oci(&s.artifact);
    let out_layers = oci.manifest["layers"].as_array().unwrap();
    assert_eq!(out_layers.len(), 5, "4 source layers + the injected one");
    let src = source["layers"].as_array().unwrap();
    assert_eq!(out_layers[0]["digest"], src[0]["digest"], "gzip copied");
    assert_eq!(out_layers[1]["digest"], src[1]["digest"], "zstd copied");
    assert_eq!(
        out_layers[1]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    assert_ne!(
        out_layers[2]["digest"], src[2]["digest"],
        "plain re-encoded"
    );
    assert_ne!(
        out_layers[3]["digest"], src[3]["digest"],
        "multi-member re-encoded"
    );
    for l in &out_layers[2..] {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
    }
    assert_eq!(
        s.warnings
            .iter()
            .filter(|w| w.contains("re-encoded"))
            .count(),
        3,
        "{:?}",
        s.warnings
    );
    // diff_ids: the source's, then the injected layer's.
    let src_config: Value = serde_json::from_slice(&common::read_blob(
        &f.layout(),
        source["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let ids = oci.config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(
        ids[..4],
        src_config["rootfs"]["diff_ids"].as_array().unwrap()[..]
    );
    assert_eq!(oci.config["history"].as_array().unwrap().len(), 5);
}

#[test]
fn docker_media_types_become_oci() {
    let f = systemd_image();
    rewrite_image(
        &f.layout(),
        |_| {},
        |m| {
            m["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json".into();
            m["config"]["mediaType"] = "application/vnd.docker.container.image.v1+json".into();
            for l in m["layers"].as_array_mut().unwrap() {
                if l["mediaType"].as_str().unwrap().ends_with("gzip") {
                    l["mediaType"] = "application/vnd.docker.image.rootfs.diff.tar.gzip".into();
                }
            }
        },
    );
    for keep in [false, true] {
        let mut o = options(&f, OutputFormat::OciArchive, None);
        o.keep_layers = keep;
        o.name = Some(format!("docker-{keep}"));
        let s = convert_ok(&o);
        let report = assert_verified(&s.artifact);
        assert!(report
            .checks
            .iter()
            .any(|c| c.rule.starts_with("Entrypoint") && c.status == Status::Warn));
        let oci = read_oci(&s.artifact);
        assert_eq!(
            oci.manifest["config"]["mediaType"],
            "application/vnd.oci.image.config.v1+json"
        );
        // Without injection the image's own entry point and user stay.
        assert_eq!(
            oci.config["config"]["Entrypoint"],
            serde_json::json!(["/usr/local/bin/hakim-entrypoint"])
        );
        assert_eq!(oci.config["config"]["User"], "coder");
    }
}

#[test]
fn services_are_installed_and_bad_inputs_are_refused() {
    let f = systemd_image();
    let init = fake_init(f.dir.path(), 62, false);
    let svc = f.dir.path().join("services");
    std::fs::create_dir(&svc).unwrap();
    std::fs::write(svc.join("dockerd.toml"), "command = [\"dockerd\"]\n").unwrap();
    std::fs::write(svc.join("README"), "not a service").unwrap();
    let mut o = options(&f, OutputFormat::OciArchive, Some(&init));
    o.inject.as_mut().unwrap().services_dir = Some(svc.clone());
    let s = convert_ok(&o);
    assert!(s
        .injected
        .contains(&"/etc/hakim/services/dockerd.toml".to_string()));
    assert!(s.warnings.iter().any(|w| w.contains("skipped README")));

    let fails = |o: ConvertOptions, needle: &str| {
        let out = o.output_dir.clone();
        let err = format!("{:#}", convert(&o).unwrap_err());
        assert!(err.contains(needle), "{err}");
        let left: Vec<_> = std::fs::read_dir(&out)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left behind: {left:?}");
    };
    let arm = fake_init(f.dir.path(), 183, false);
    let mut o = options(&f, OutputFormat::Rootfs, Some(&arm));
    o.output_dir = f.dir.path().join("bad1");
    fails(o, "ELF machine 183");
    let mut o = options(
        &f,
        OutputFormat::Rootfs,
        Some(&f.dir.path().join("missing")),
    );
    o.output_dir = f.dir.path().join("bad2");
    fails(o, "--inject-init");
    let mut o = options(&f, OutputFormat::OciArchive, None);
    o.compression = OutputCompression::Xz;
    o.output_dir = f.dir.path().join("bad3");
    fails(o, "gzip or zstd");
    let mut o = options(&f, OutputFormat::Rootfs, None);
    o.keep_layers = true;
    o.output_dir = f.dir.path().join("bad4");
    fails(o, "--keep-layers");
    let mut o = options(&f, OutputFormat::Rootfs, None);
    o.push = Some("127.0.0.1:5000/x:y".into());
    o.output_dir = f.dir.path().join("bad5");
    fails(o, "--push needs --format oci-archive");
    let mut o = options(&f, OutputFormat::OciArchive, None);
    o.push = Some("127.0.0.1:5000/x@sha256:0000".into());
    o.output_dir = f.dir.path().join("bad6");
    fails(o, "--push");

    // A dynamically linked init is allowed, with a warning.
    let dynamic = fake_init(f.dir.path(), 62, true);
    let mut o = options(&f, OutputFormat::Rootfs, Some(&dynamic));
    o.output_dir = f.dir.path().join("dyn");
    let s = convert_ok(&o);
    assert!(s.warnings.iter().any(|w| w.contains("dynamically linked")));
}
