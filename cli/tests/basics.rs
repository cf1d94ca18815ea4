//! The first commands run as a person runs them: the real `pixmarket` binary on a temp folder.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

fn pixmarket(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pixmarket"))
        .args(args)
        .env_remove("PIXMARKET_DATA_DIR")
        .output()
        .expect("run pixmarket")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn price_reproduces_the_brief() {
    let o = pixmarket(&[
        "price",
        "--width",
        "1024",
        "--height",
        "1024",
        "--steps",
        "50",
        "--prompt-tokens",
        "100",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "100.000000 tokens\n");

    let o = pixmarket(&[
        "price",
        "--width",
        "512",
        "--height",
        "512",
        "--steps",
        "30",
        "--prompt-tokens",
        "100",
    ]);
    assert_eq!(stdout(&o), "15.000000 tokens\n");

    let o = pixmarket(&[
        "price",
        "--width",
        "512",
        "--height",
        "512",
        "--steps",
        "30",
        "--prompt-tokens",
        "100",
        "--images",
        "2",
        "--price-factor",
        "1.5",
    ]);
    assert_eq!(stdout(&o), "45.000000 tokens\n");

    let o = pixmarket(&[
        "price",
        "--width",
        "1024",
        "--height",
        "1024",
        "--steps",
        "50",
        "--prompt-tokens",
        "4",
        "--min-prompt-tokens",
        "100",
    ]);
    assert_eq!(stdout(&o), "100.000000 tokens\n");
}

#[test]
fn bad_price_arguments_give_one_clear_line() {
    for (args, needle) in [
        (
            vec![
                "--width",
                "1000",
                "--height",
                "1024",
                "--steps",
                "50",
                "--prompt-tokens",
                "100",
            ],
            "width",
        ),
        (
            vec![
                "--width",
                "1024",
                "--height",
                "1024",
                "--steps",
                "0",
                "--prompt-tokens",
                "100",
            ],
            "steps",
        ),
        (
            vec![
                "--width",
                "1024",
                "--height",
                "1024",
                "--steps",
                "50",
                "--prompt-tokens",
                "100",
                "--price-factor=-1",
            ],
            "--price-factor",
        ),
        (
            vec![
                "--width=-5",
                "--height",
                "1024",
                "--steps",
                "50",
                "--prompt-tokens",
                "100",
            ],
            "--width",
        ),
    ] {
        let mut full = vec!["price"];
        full.extend(args);
        let o = pixmarket(&full);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(err.contains(needle), "{err}");
        assert!(err.starts_with("error"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Our own errors are exactly one line.
    let o = pixmarket(&[
        "price",
        "--width",
        "1000",
        "--height",
        "1024",
        "--steps",
        "50",
        "--prompt-tokens",
        "100",
    ]);
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

#[test]
fn init_then_id_print_the_same_peer() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let data = data.to_str().unwrap();
    let o = pixmarket(&["init", "--data-dir", data]);
    assert!(o.status.success(), "{}", stderr(&o));
    let peer = stdout(&o)
        .lines()
        .find_map(|l| l.strip_prefix("peer id: "))
        .unwrap()
        .to_owned();
    assert!(peer.starts_with("12D3KooW"), "{peer}");

    let o = pixmarket(&["id", "--data-dir", data]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), peer);

    // A second init refuses and keeps the identity.
    let o = pixmarket(&["init", "--data-dir", data]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already initialised"), "{}", stderr(&o));
    let o = pixmarket(&["id", "--data-dir", data]);
    assert_eq!(stdout(&o).trim(), peer);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = std::path::Path::new(data).join("identity.key");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let o = pixmarket(&["id", "--data-dir", data]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    }
}

#[test]
fn id_of_an_empty_folder_says_how_to_init() {
    let dir = tempfile::tempdir().unwrap();
    let o = pixmarket(&["id", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("pixmarket init"), "{}", stderr(&o));
}
