use super::*;
use crate::{MemStore, SledStore};
use nexa_shared::artifact::SealRequest;
use std::sync::Arc;

fn sealed(dir: &Path, name: &str, content: &str, labels: &[(&str, &str)]) -> PathBuf {
    let out = dir.join(name);
    let tmp = artifact::tmp_path(&out);
    std::fs::create_dir_all(&tmp).expect("mkdir");
    std::fs::write(tmp.join("model.bin"), content).expect("write");
    artifact::seal(
        &out,
        SealRequest {
            kind: "checkpoint".into(),
            inputs: vec![],
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            expected: None,
            provenance: None,
        },
    )
    .expect("seal");
    out
}

fn uri(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn versions_follow_semver_bumps_and_resolve_every_way() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = MemStore::default();
    let r = Registry::new(&store);
    let a = sealed(d.path(), "a", "one", &[]);
    let meta = serde_json::json!({"acc": 0.9});
    let v = |bump| {
        r.register("clf", &uri(&a), meta.clone(), bump)
            .expect("register")
            .version
    };
    assert_eq!(v(Bump::Patch), "0.1.0");
    assert_eq!(v(Bump::Patch), "0.1.1");
    assert_eq!(v(Bump::Minor), "0.2.0");
    assert_eq!(v(Bump::Major), "1.0.0");
    assert_eq!(v(Bump::Patch), "1.0.1");
    assert_eq!(r.resolve("clf").expect("bare").version, "1.0.1");
    assert_eq!(r.resolve("clf:latest").expect("latest").version, "1.0.1");
    assert_eq!(r.resolve("clf:0.2.0").expect("exact").version, "0.2.0");
    let got = r.resolve("clf:0.2.0").expect("exact");
    assert_eq!(got.uri, format!("file://{}", a.display()));
    assert_eq!(got.meta, meta);
    assert!(
        got.hash
            .as_deref()
            .is_some_and(|h| h.starts_with("blake3:"))
    );
    r.promote("clf", "0.1.1", "prod").expect("promote");
    assert_eq!(r.resolve("clf:prod").expect("tag").version, "0.1.1");
    assert!(matches!(r.resolve("clf:9.9.9"), Err(Error::NotFound(_))));
    assert!(matches!(r.resolve("nope"), Err(Error::NotFound(_))));
    assert!(
        r.register("../x", &uri(&a), meta.clone(), Bump::Patch)
            .is_err()
    );
    assert!(
        r.promote("clf", "0.1.0", "1.0.0").is_err(),
        "a tag may not look like a version"
    );
    assert!(r.promote("clf", "0.1.0", "latest").is_err());
}

#[test]
fn promote_refuses_unsealed_tampered_and_forged_artifacts() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = MemStore::default();
    let r = Registry::new(&store);
    // Registration needs COMPLETE.
    let a = sealed(d.path(), "a", "weights", &[]);
    std::fs::remove_file(a.join(artifact::COMPLETE)).expect("unseal");
    let e = r
        .register("m", &uri(&a), serde_json::Value::Null, Bump::Patch)
        .expect_err("unsealed");
    assert!(e.to_string().contains("COMPLETE"), "{e}");

    // Sealed at registration, unsealed before promotion.
    let b = sealed(d.path(), "b", "weights", &[]);
    r.register("m", &uri(&b), serde_json::Value::Null, Bump::Patch)
        .expect("register");
    std::fs::remove_file(b.join(artifact::COMPLETE)).expect("unseal");
    let e = r.promote("m", "0.1.0", "prod").expect_err("no COMPLETE");
    assert!(e.to_string().contains("COMPLETE"), "{e}");

    // A payload byte changed on disk.
    let c = sealed(d.path(), "c", "weights", &[]);
    let v = r
        .register("m", &uri(&c), serde_json::Value::Null, Bump::Patch)
        .expect("register");
    let f = c.join("model.bin");
    let mut perm = std::fs::metadata(&f).expect("stat").permissions();
    use std::os::unix::fs::PermissionsExt;
    perm.set_mode(0o644);
    std::fs::set_permissions(&f, perm).expect("chmod");
    std::fs::write(&f, "weightz").expect("tamper");
    let e = r.promote("m", &v.version, "prod").expect_err("tampered");
    assert!(e.to_string().contains("does not match"), "{e}");

    // A signature label that does not verify.
    let forged = r#"{"job_id":"j","generation":1,"attempt":1,"exit_code":0,"outcome":"succeeded","outputs":[],"started_ms":0,"ended_ms":0,"worker":"00","signature":"00"}"#;
    let s = sealed(
        d.path(),
        "s",
        "weights",
        &[(provenance::SIGNED_LABEL, forged)],
    );
    let v = r
        .register("m", &uri(&s), serde_json::Value::Null, Bump::Patch)
        .expect("register");
    assert!(
        r.promote("m", &v.version, "prod").is_err(),
        "forged signature"
    );

    // Nothing was promoted by any of the refusals.
    assert!(r.show("m").expect("show").tags.is_empty());
    assert!(r.show("m").expect("show").history.is_empty());
}

#[test]
fn a_tagged_version_cannot_be_deleted_and_a_deleted_one_cannot_be_promoted() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = MemStore::default();
    let r = Registry::new(&store);
    let a = sealed(d.path(), "a", "x", &[]);
    for _ in 0..3 {
        r.register("m", &uri(&a), serde_json::Value::Null, Bump::Patch)
            .expect("register");
    }
    r.promote("m", "0.1.1", "prod").expect("promote");
    let e = r.delete("m", "0.1.1").expect_err("tagged");
    assert!(e.to_string().contains("prod"), "{e}");
    r.delete("m", "0.1.2").expect("delete untagged");
    assert!(r.promote("m", "0.1.2", "prod").is_err());
    assert_eq!(r.resolve("m").expect("latest").version, "0.1.1");
    assert!(r.resolve("m:0.1.2").is_err());
    // A number is never handed out twice.
    let v = r
        .register("m", &uri(&a), serde_json::Value::Null, Bump::Patch)
        .expect("register");
    assert_eq!(v.version, "0.1.3");
    // Every tag names a live version.
    let m = r.show("m").expect("show");
    for t in m.tags.values() {
        assert!(m.versions[&t.version].deleted_at.is_none());
    }
}

#[test]
fn concurrent_registrations_and_promotions_keep_one_consistent_record() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SledStore::open(&d.path().join("db")).expect("open"));
    let a = sealed(d.path(), "a", "x", &[]);
    let threads = 8;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let store = store.clone();
            let u = uri(&a);
            std::thread::spawn(move || {
                Registry::new(store.as_ref())
                    .register("m", &u, serde_json::Value::Null, Bump::Patch)
                    .expect("register")
                    .version
            })
        })
        .collect();
    let mut versions: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    versions.sort();
    versions.dedup();
    assert_eq!(
        versions.len(),
        threads,
        "every registration got its own version"
    );

    // Every thread promotes a different version to `prod`, several times over.
    let handles: Vec<_> = versions
        .iter()
        .cloned()
        .map(|v| {
            let store = store.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    Registry::new(store.as_ref())
                        .promote("m", &v, "prod")
                        .expect("promote");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    let r = Registry::new(store.as_ref());
    let m = r.show("m").expect("show");
    let prod: Vec<&Promotion> = m.history.iter().filter(|p| p.tag == "prod").collect();
    // Every swap that changed the holder is in the history (promoting the holder again
    // is a no-op), and every version held the tag at some point.
    assert!(
        prod.len() >= threads && prod.len() <= threads * 5,
        "{}",
        prod.len()
    );
    for v in &versions {
        assert!(prod.iter().any(|p| &p.version == v), "{v} never held prod");
    }
    let open: Vec<&&Promotion> = prod.iter().filter(|p| p.to.is_none()).collect();
    assert_eq!(open.len(), 1, "exactly one holder at the end");
    assert_eq!(m.tags["prod"].version, open[0].version);
    assert_eq!(r.resolve("m:prod").expect("tag").version, open[0].version);
    // The stretches follow one another: each ends when the next begins.
    for w in prod.windows(2) {
        assert_eq!(w[0].to.as_deref(), Some(w[1].from.as_str()));
    }
}

#[test]
fn the_registry_survives_reopening_the_store() {
    let d = tempfile::tempdir().expect("tempdir");
    let a = sealed(d.path(), "a", "x", &[]);
    {
        let s = SledStore::open(&d.path().join("db")).expect("open");
        let r = Registry::new(&s);
        r.register("m", &uri(&a), serde_json::json!({"k": 1}), Bump::Minor)
            .expect("register");
        r.promote("m", "0.1.0", "prod").expect("promote");
    }
    let s = SledStore::open(&d.path().join("db")).expect("reopen");
    let r = Registry::new(&s);
    assert_eq!(r.resolve("m:prod").expect("tag").version, "0.1.0");
    assert_eq!(r.list().expect("list").len(), 1);
}
