//! `nexa models ...` end to end: a pipeline's sealed output registered, promoted,
//! resolved and traced through its history with the real binary.

mod common;

use common::{Project, numbered_pipeline, text};

fn ok(p: &Project, args: &[&str]) -> String {
    let out = p.nexa(args);
    assert!(out.status.success(), "nexa {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn register_promote_resolve_and_history_on_a_pipelines_artifacts() {
    let p = Project::new();
    p.write(
        "m.yaml",
        &numbered_pipeline("train", 2, true, |i| {
            format!("echo weights-{i} > \"$NEXA_OUT/model.bin\"")
        }),
    );
    ok(&p, &["pipeline", "run", "m.yaml"]);
    let reg = ok(
        &p,
        &[
            "models",
            "register",
            "clf",
            "artifacts/s0",
            "--meta",
            r#"{"accuracy": 0.91}"#,
        ],
    );
    assert!(reg.contains("registered clf:0.1.0"), "{reg}");
    ok(
        &p,
        &[
            "models",
            "register",
            "clf",
            "artifacts/s1",
            "--bump",
            "minor",
        ],
    );
    ok(&p, &["models", "promote", "clf", "0.1.0", "prod"]);
    ok(&p, &["models", "promote", "clf", "latest", "prod"]);
    let uri = ok(&p, &["models", "resolve", "clf:prod"]);
    assert!(uri.trim().ends_with("artifacts/s1"), "{uri}");
    let latest: serde_json::Value =
        serde_json::from_str(&ok(&p, &["models", "resolve", "clf", "--json"])).expect("json");
    assert_eq!(latest["version"], "0.2.0");
    let first: serde_json::Value =
        serde_json::from_str(&ok(&p, &["models", "resolve", "clf:0.1.0", "--json"])).expect("json");
    assert_eq!(first["meta"]["accuracy"], 0.91);

    let history: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&p, &["models", "history", "clf", "--json"])).expect("json");
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["version"], "0.1.0");
    assert_eq!(history[0]["to"], history[1]["from"]);
    assert_eq!(history[1]["version"], "0.2.0");
    assert!(history[1]["to"].is_null());
    let text_history = ok(&p, &["models", "history", "clf"]);
    assert!(text_history.contains("prod       0.2.0"), "{text_history}");

    // The tagged version cannot be deleted; the other can, and is then gone.
    let out = p.nexa(&["models", "delete", "clf", "0.2.0"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prod"));
    ok(&p, &["models", "delete", "clf", "0.1.0"]);
    assert!(!p.nexa(&["models", "resolve", "clf:0.1.0"]).status.success());

    // A payload changed on disk after registration: promotion is refused and says why.
    let bin = p.path().join("artifacts/s1/model.bin");
    let mut perm = std::fs::metadata(&bin).expect("stat").permissions();
    use std::os::unix::fs::PermissionsExt;
    perm.set_mode(0o644);
    std::fs::set_permissions(&bin, perm).expect("chmod");
    std::fs::write(&bin, "poisoned\n").expect("tamper");
    let out = p.nexa(&["models", "promote", "clf", "0.2.0", "staging"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refusing to promote clf:0.2.0"),
        "{}",
        text(&out)
    );
    let list = ok(&p, &["models", "list"]);
    assert!(
        list.contains("prod=0.2.0") && !list.contains("staging"),
        "{list}"
    );
}
