//! `convert` announces at once what `verify` would refuse: for every image
//! below, in both formats, the rules `convert` reports (`Summary::proxmox`,
//! its warnings and `--json`) are exactly those `verify` does not pass on the
//! artifact, each with its fix. (Every other fixture conversion of the suite
//! makes the same comparison through `common::assert_convert_matches_verify`;
//! the real images of `tests/` do it through the command line.)

mod common;

use std::path::Path;
use std::process::Command;

use common::{assert_convert_matches_verify, fake_init};
use hakim_convert::acceptance::{RuleId, Status};
use hakim_convert::compress::OutputCompression;
use hakim_convert::convert::{convert, ConvertOptions, OutputFormat, Summary};
use hakim_convert::inject::InjectOptions;
use hakim_convert::sample::{write_oci_layout, BlobCompression, LayerBuilder as L, SampleLayer};
use serde_json::json;

/// An application image as `docker save` gives it: no `/sbin/init`, an
/// os-release Proxmox does not manage, an Entrypoint and a User.
fn app_image(dir: &Path, high_ids: bool, whiteout_layer: bool) -> String {
    let mut base = L::new()
        .dir("etc/", 0o755)
        .file("etc/os-release", "ID=wolfi\nVERSION_ID=20230201\n")
        .dir("app/", 0o755)
        .file_mode("app/server", "#!/bin/sh\n", 0o755)
        .file("app/old", "x");
    if high_ids {
        base = base
            .owner(70000, 70000)
            .file("app/data", "owned by a high id");
    }
    let mut layers = vec![SampleLayer::new(base.finish(), BlobCompression::Gzip)];
    if whiteout_layer {
        layers.push(SampleLayer::new(
            L::new().whiteout("app/old").finish(),
            BlobCompression::Zstd,
        ));
    }
    write_oci_layout(
        &dir.join("layout"),
        "app:1",
        "amd64",
        &layers,
        json!({"Entrypoint": ["/app/server"], "User": "1000"}),
    )
    .unwrap();
    format!("oci:{}:1", dir.join("layout").display())
}

/// A Debian-like system image with an init.
fn system_image(dir: &Path) -> String {
    let layer = L::new()
        .dir("etc/", 0o755)
        .file(
            "etc/os-release",
            "ID=debian\nVERSION_CODENAME=trixie\nVERSION_ID=13\n",
        )
        .dir("usr/", 0o755)
        .dir("usr/sbin/", 0o755)
        .symlink("sbin", "usr/sbin")
        .dir("usr/lib/", 0o755)
        .dir("usr/lib/systemd/", 0o755)
        .file_mode("usr/lib/systemd/systemd", "ELF", 0o755)
        .symlink("usr/sbin/init", "../lib/systemd/systemd")
        .finish();
    write_oci_layout(
        &dir.join("layout"),
        "hakim-base:1",
        "amd64",
        &[SampleLayer::new(layer, BlobCompression::Gzip)],
        json!({}),
    )
    .unwrap();
    format!("oci:{}:1", dir.join("layout").display())
}

fn options(source: String, out: &Path, format: OutputFormat) -> ConvertOptions {
    ConvertOptions {
        format,
        compression: match format {
            OutputFormat::Rootfs => OutputCompression::Zstd,
            OutputFormat::OciArchive => OutputCompression::Gzip,
        },
        threads: Some(1),
        ..ConvertOptions::new(source, out)
    }
}

fn announced(s: &Summary) -> Vec<(RuleId, Option<usize>, Status)> {
    let mut v: Vec<_> = s
        .proxmox
        .iter()
        .map(|c| (c.id.expect("announced rules have ids"), c.layer, c.status))
        .collect();
    v.sort_by_key(|(id, layer, _)| (*id, *layer));
    v
}

fn converted(o: &ConvertOptions) -> Summary {
    let s = convert(o).unwrap_or_else(|e| panic!("{e:#}"));
    assert_convert_matches_verify(&s);
    s
}

#[test]
fn an_application_image_as_a_rootfs_is_announced_with_its_fixes() {
    let dir = tempfile::tempdir().unwrap();
    let source = app_image(dir.path(), true, false);
    let s = converted(&options(
        source,
        &dir.path().join("out"),
        OutputFormat::Rootfs,
    ));
    assert_eq!(
        announced(&s),
        [
            (RuleId::IdsBelow65536, None, Status::Fail),
            (RuleId::SbinInit, None, Status::Fail),
            (RuleId::OsReleaseManaged, None, Status::Warn),
        ]
    );
    let all = s.warnings.join("\n");
    for fix in ["--inject-init", "ostype unmanaged", "privileged container"] {
        assert!(all.contains(fix), "no '{fix}' in the warnings:\n{all}");
    }
}

#[test]
fn injecting_the_init_meets_the_init_rule() {
    let dir = tempfile::tempdir().unwrap();
    let source = app_image(dir.path(), false, false);
    let init = fake_init(dir.path(), 62, false);
    let s = converted(&ConvertOptions {
        inject: Some(InjectOptions {
            init_binary: init,
            services_dir: None,
            keep_ssh_host_keys: false,
        }),
        ..options(source, &dir.path().join("out"), OutputFormat::Rootfs)
    });
    assert_eq!(
        announced(&s),
        [(RuleId::OsReleaseManaged, None, Status::Warn)]
    );
}

#[test]
fn a_system_image_meets_every_rule() {
    let dir = tempfile::tempdir().unwrap();
    let source = system_image(dir.path());
    let s = converted(&options(
        source,
        &dir.path().join("out"),
        OutputFormat::Rootfs,
    ));
    assert_eq!(announced(&s), []);
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn oci_archives_announce_entrypoint_user_ids_and_kept_whiteouts() {
    let dir = tempfile::tempdir().unwrap();
    let source = app_image(dir.path(), true, true);
    let s = converted(&options(
        source.clone(),
        &dir.path().join("flat"),
        OutputFormat::OciArchive,
    ));
    assert_eq!(
        announced(&s),
        [
            (RuleId::IdsBelow65536, Some(1), Status::Fail),
            (RuleId::EntrypointInit, None, Status::Warn),
            (RuleId::NoUser, None, Status::Warn),
        ]
    );
    // Kept layers are held to the same rules, layer by layer.
    let s = converted(&ConvertOptions {
        keep_layers: true,
        ..options(source, &dir.path().join("kept"), OutputFormat::OciArchive)
    });
    assert_eq!(
        announced(&s),
        [
            (RuleId::IdsBelow65536, Some(1), Status::Fail),
            (RuleId::NoWhiteouts, Some(2), Status::Warn),
            (RuleId::EntrypointInit, None, Status::Warn),
            (RuleId::NoUser, None, Status::Warn),
        ]
    );
}

#[test]
fn the_command_line_announces_on_stderr_and_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let source = app_image(dir.path(), false, false);
    let out = Command::new(env!("CARGO_BIN_EXE_hakim-convert"))
        .args([&source, "--compression", "zstd", "-q", "--json", "-o"])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: Proxmox: /sbin/init resolves inside the root")
            && stderr.contains("fix: convert with --inject-init PATH"),
        "{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = summary["proxmox"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sbin-init", "os-release-managed"]);
    assert_eq!(summary["proxmox"][0]["status"], "fail");
}
