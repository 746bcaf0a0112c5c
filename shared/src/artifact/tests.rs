use super::*;

fn stage(out: &Path, files: &[(&str, &str)]) {
    let tmp = tmp_path(out);
    fs::create_dir_all(&tmp).expect("mkdir");
    for (n, c) in files {
        let p = tmp.join(n);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).expect("mkdir");
        }
        fs::write(p, c).expect("write");
    }
}

fn req(key: &str) -> SealRequest {
    SealRequest {
        kind: "dataset".into(),
        inputs: vec![],
        labels: [("cache_key".to_string(), key.to_string())]
            .into_iter()
            .collect(),
        expected: None,
        provenance: None,
    }
}

#[test]
fn seal_writes_meta_and_complete_and_replaces_old() {
    let d = tempfile::tempdir().expect("tempdir");
    let out = d.path().join("art");
    stage(&out, &[("a.txt", "one"), ("sub/b.txt", "two")]);
    let (meta, tree) = seal(&out, req("k1")).expect("seal");
    assert!(is_complete(&out));
    assert!(!tmp_path(&out).exists());
    assert_eq!(meta.bytes, 6);
    assert_eq!(meta.hash, tree.digest);
    assert!(meta.hash.starts_with("blake3:"));
    assert_eq!(read_meta(&out).expect("meta"), meta);
    assert!(check_cached(&out, "k1", true).is_ok());
    assert_eq!(check_cached(&out, "k2", false), Err(Miss::KeyChanged));

    stage(&out, &[("a.txt", "new")]);
    let (m2, _) = seal(&out, req("k2")).expect("reseal");
    assert_eq!(fs::read_to_string(out.join("a.txt")).expect("read"), "new");
    assert!(!out.join("sub").exists());
    assert!(!old_path(&out).exists());
    assert_eq!(verify(&out).expect("verify").hash, m2.hash);
}

#[test]
fn payload_changes_are_detected() {
    let d = tempfile::tempdir().expect("tempdir");
    let out = d.path().join("art");
    stage(&out, &[("a.txt", "one")]);
    seal(&out, req("k")).expect("seal");
    let p = out.join("a.txt");
    let mut perm = fs::metadata(&p).expect("stat").permissions();
    use std::os::unix::fs::PermissionsExt;
    perm.set_mode(0o644);
    fs::set_permissions(&p, perm).expect("chmod");
    fs::write(&p, "onE").expect("write");
    // Same size: only --verify sees it.
    assert!(check_cached(&out, "k", false).is_ok());
    assert_eq!(check_cached(&out, "k", true), Err(Miss::HashMismatch));
    assert!(verify(&out).is_err());
    fs::write(&p, "longer").expect("write");
    assert!(matches!(
        check_cached(&out, "k", false),
        Err(Miss::PayloadChanged(_))
    ));
}

#[test]
fn recovery_from_every_crash_point_leaves_old_or_new() {
    let d = tempfile::tempdir().expect("tempdir");
    let out = d.path().join("art");
    stage(&out, &[("a.txt", "old")]);
    seal(&out, req("old")).expect("seal");

    // 1. Crash while writing the payload: a stale .tmp.
    stage(&out, &[("a.txt", "half")]);
    assert_eq!(recover(&out).expect("recover"), Recovery::RemovedTmp);
    assert_eq!(read_meta(&out).expect("meta").labels["cache_key"], "old");

    // 2. Crash after moving the old one aside, before the rename.
    fs::rename(&out, old_path(&out)).expect("rename");
    stage(&out, &[("a.txt", "new")]);
    assert_eq!(recover(&out).expect("recover"), Recovery::RestoredOld);
    assert!(is_complete(&out));
    assert_eq!(fs::read_to_string(out.join("a.txt")).expect("read"), "old");

    // 3. Crash after the rename, before COMPLETE: the new payload verifies, so it is sealed.
    let scratch = d.path().join("scratch");
    stage(&scratch, &[("a.txt", "new")]);
    seal(&scratch, req("new")).expect("seal");
    fs::remove_file(scratch.join(COMPLETE)).expect("unseal");
    fs::rename(&out, old_path(&out)).expect("rename");
    fs::rename(&scratch, &out).expect("rename");
    assert_eq!(recover(&out).expect("recover"), Recovery::SealedNew);
    assert_eq!(read_meta(&out).expect("meta").labels["cache_key"], "new");
    assert!(!old_path(&out).exists());

    // 4. A half artifact whose payload does not match its meta goes; the old one returns.
    fs::rename(&out, old_path(&out)).expect("rename");
    fs::create_dir_all(&out).expect("mkdir");
    fs::write(out.join(META), "{not json").expect("write");
    assert_eq!(recover(&out).expect("recover"), Recovery::RestoredOld);
    assert_eq!(read_meta(&out).expect("meta").labels["cache_key"], "new");
    assert_eq!(recover(&out).expect("recover"), Recovery::Clean);
}

#[test]
fn pointers_move_only_to_sealed_artifacts() {
    let d = tempfile::tempdir().expect("tempdir");
    let out = d.path().join("a/art");
    let link = d.path().join("latest");
    fs::create_dir_all(&out).expect("mkdir");
    assert!(set_pointer(&link, &out).is_err());
    fs::remove_dir(&out).expect("rmdir");
    stage(&out, &[("x", "1")]);
    seal(&out, req("k")).expect("seal");
    set_pointer(&link, &out).expect("pointer");
    assert_eq!(fs::read_link(&link).expect("link"), PathBuf::from("a/art"));
    assert!(link.join(COMPLETE).is_file());
}

#[test]
fn reserved_names_in_payload_are_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let out = d.path().join("art");
    stage(&out, &[("COMPLETE", "")]);
    assert!(seal(&out, req("k")).is_err());
}

#[test]
fn a_payload_that_differs_from_the_manifest_is_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let out = d.path().join("art");
    stage(&out, &[("a.txt", "one")]);
    let mut r = req("k");
    r.expected = Some(vec![digest::FileEntry {
        path: "a.txt".into(),
        size: 3,
        digest: digest::format(&blake3::hash(b"two")),
    }]);
    let err = seal(&out, r).expect_err("tampered");
    assert!(
        err.to_string()
            .contains("does not match the signed manifest"),
        "{err}"
    );
    assert!(!out.exists() && !tmp_path(&out).exists());
}

#[test]
fn a_group_seals_each_artifact_and_one_failure_spares_the_others() {
    let d = tempfile::tempdir().expect("tempdir");
    let outs: Vec<PathBuf> = (0..5).map(|i| d.path().join(format!("a{i}"))).collect();
    // a1 already holds an artifact that the group replaces.
    stage(&outs[1], &[("x", "before")]);
    seal(&outs[1], req("old")).expect("seal");
    for (i, out) in outs.iter().enumerate() {
        stage(out, &[("x", &format!("payload {i}"))]);
    }
    let mut reqs: Vec<(PathBuf, SealRequest)> =
        outs.iter().map(|o| (o.clone(), req("k"))).collect();
    // a3 claims a file it did not upload.
    reqs[3].1.expected = Some(vec![digest::FileEntry {
        path: "y".into(),
        size: 1,
        digest: digest::format(&blake3::hash(b"y")),
    }]);
    let results = seal_group(reqs);
    assert_eq!(results.len(), 5);
    for (i, (r, out)) in results.iter().zip(&outs).enumerate() {
        if i == 3 {
            let e = r.as_ref().expect_err("a3 is refused");
            assert!(e.to_string().contains("signed manifest"), "{e}");
            assert!(!out.exists() && !tmp_path(out).exists());
            continue;
        }
        let (meta, _) = r.as_ref().expect("sealed");
        assert!(is_complete(out));
        assert_eq!(verify(out).expect("verify").hash, meta.hash);
        assert_eq!(
            fs::read_to_string(out.join("x")).expect("read"),
            format!("payload {i}")
        );
        assert!(!tmp_path(out).exists() && !old_path(out).exists());
    }
}

#[test]
fn sealing_never_changes_a_file_outside_the_artifact_through_a_hard_link() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let d = tempfile::tempdir().expect("tempdir");
    // A file outside the artifact, writable, and a job output hard-linked to it.
    let outside = d.path().join("outside.txt");
    fs::write(&outside, "host file\n").expect("write");
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = d.path().join("artifacts/a");
    let tmp = tmp_path(&out);
    fs::create_dir_all(&tmp).expect("mkdir");
    fs::hard_link(&outside, tmp.join("passwd")).expect("link");
    seal(&out, req("k")).expect("seal");
    let meta = fs::metadata(&outside).expect("stat");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o644,
        "the host file was chmodded"
    );
    assert_eq!(
        meta.nlink(),
        1,
        "the artifact still shares the host file's inode"
    );
    assert_eq!(fs::read(out.join("passwd")).expect("read"), b"host file\n");
    // The host file changing later does not change the sealed artifact.
    fs::write(&outside, "changed\n").expect("write");
    verify(&out).expect("the artifact is its own");
}

#[test]
fn a_symlink_in_a_payload_is_refused_and_its_target_untouched() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().expect("tempdir");
    let outside = d.path().join("outside.txt");
    fs::write(&outside, "host file\n").expect("write");
    let out = d.path().join("artifacts/a");
    let tmp = tmp_path(&out);
    fs::create_dir_all(&tmp).expect("mkdir");
    std::os::unix::fs::symlink(&outside, tmp.join("l")).expect("symlink");
    let e = seal(&out, req("k")).expect_err("symlink");
    assert!(e.to_string().contains("symlinks are not allowed"), "{e}");
    let mode = fs::metadata(&outside).expect("stat").permissions().mode();
    assert_eq!(mode & 0o200, 0o200, "the target is still writable");
    assert!(!is_complete(&out));
}
