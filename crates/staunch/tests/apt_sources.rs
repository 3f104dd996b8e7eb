//! The fetch scripts take their package sources from the machine's own apt
//! configuration (`scripts/apt_sources.sh`): both source formats, options,
//! several URIs and suites per deb822 stanza, disabled entries, a suite
//! derived from its archive, and a clear error when there is no Debian
//! source at all. Run against apt configurations built here.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `debian_sources SUITES` with `etc` as /etc/apt: (status, stdout, stderr).
fn sources(etc: &Path, suites: &str) -> (bool, String, String) {
    let cache = etc.join("cache");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail; source scripts/lib.sh; debian_sources {suites}"))
        .current_dir(root())
        .env("APT_ETC", etc)
        .env("STAUNCH_CACHE", &cache)
        .output()
        .expect("bash");
    let s = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.success(), s(out.stdout), s(out.stderr))
}

fn etc(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let d = std::env::temp_dir().join(format!("staunch-apt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("sources.list.d")).unwrap();
    for (f, text) in files {
        std::fs::write(d.join(f), text).unwrap();
    }
    d
}

#[test]
fn one_line_format_with_options() {
    let d = etc(
        "oneline",
        &[(
            "sources.list",
            "# a comment\n\
             deb-src http://src.example/debian bookworm main\n\
             deb [arch=amd64 signed-by=/k/debian.gpg] http://mirror.example/debian bookworm main contrib\n\
             deb http://mirror.example/security bookworm-security main\n",
        )],
    );
    let (ok, out, err) = sources(&d, "bookworm bookworm-security bookworm-backports");
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "deb [signed-by=/k/debian.gpg] http://mirror.example/debian bookworm main",
            "deb http://mirror.example/security bookworm-security main",
            // Not listed: from the archive that carries bookworm.
            "deb [signed-by=/k/debian.gpg] http://mirror.example/debian bookworm-backports main",
        ]
    );
}

#[test]
fn deb822_with_several_uris_and_suites() {
    let d = etc(
        "deb822",
        &[
            (
                "sources.list.d/debian.sources",
                "Types: deb\n\
                 # the operator's snapshot\n\
                 URIs: http://snap.example/debian http://proxy.example/debian\n\
                 Suites: bookworm\n bookworm-updates\n\
                 Components: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\
                 \n\
                 Types: deb-src\n\
                 URIs: http://src.example/debian\n\
                 Suites: bookworm-backports\n\
                 \n\
                 Types: deb\n\
                 URIs: http://off.example/debian\n\
                 Suites: bookworm-backports\n\
                 Enabled: no\n\
                 \n\
                 Types: deb\n\
                 URIs: http://sec.example/debian-security\n\
                 Suites: bookworm-security\n\
                 Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n -----END PGP PUBLIC KEY BLOCK-----\n",
            ),
            // Not a sources file: ignored.
            ("sources.list.d/other.sources.disabled", "Types: deb\nURIs: http://no.example/\nSuites: bookworm\n"),
        ],
    );
    let (ok, out, err) = sources(&d, "bookworm bookworm-updates bookworm-security bookworm-backports");
    assert!(ok, "{err}");
    let k = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]";
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("deb {k} http://snap.example/debian bookworm main"),
            format!("deb {k} http://snap.example/debian bookworm-updates main"),
            // An embedded key: left to the default keyrings.
            "deb http://sec.example/debian-security bookworm-security main".to_string(),
            // The disabled and the source-only stanzas are not used.
            format!("deb {k} http://snap.example/debian bookworm-backports main"),
        ]
    );
}

#[test]
fn no_debian_source_is_a_clear_error() {
    let d = etc(
        "none",
        &[("sources.list.d/node.sources", "Types: deb\nURIs: https://node.example/node_20.x\nSuites: nodistro\n")],
    );
    let (ok, out, err) = sources(&d, "bookworm bookworm-backports");
    assert!(!ok, "{out}");
    assert!(err.contains("no apt source for Debian 'bookworm'"), "{err}");
    assert!(err.contains("node.sources"), "names the files read: {err}");
    // A suite that is missing and cannot be derived is left out, said so.
    let d = etc("nosec", &[("sources.list", "deb http://m.example/debian bookworm main\n")]);
    let (ok, out, err) = sources(&d, "bookworm bookworm-security");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "deb http://m.example/debian bookworm main");
    assert!(err.contains("no apt source for 'bookworm-security'"), "{err}");
}

#[test]
fn the_scripts_name_no_package_mirror() {
    for e in std::fs::read_dir(root().join("scripts")).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        for l in text.lines().filter(|l| l.contains("http://") || l.contains("https://")) {
            assert!(l.contains("rustup.rs"), "{}: {l}", p.display());
        }
    }
}
