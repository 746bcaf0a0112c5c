//! The provenance file of an assembled artifact: written a line at a time, pinned by
//! meta.json, and every way of changing it found out by `verify_artifact`.

use super::*;
use crate::artifact::SealRequest;
use crate::job::JobResult;
use crate::signing::Identity;

/// A result of shard `index` signed by `id`, with one output file `n` holding `body`.
fn signed_result(id: &Identity, index: u32, body: &[u8]) -> JobResult {
    let mut r = JobResult {
        job_id: format!("run/fan#{index}").into(),
        generation: 1,
        attempt: 1,
        outcome: crate::job::Outcome::Succeeded,
        exit_code: Some(0),
        outputs: vec![OutputFile {
            output: "out".into(),
            path: "n".into(),
            size: body.len() as u64,
            digest: crate::digest::format(&blake3::hash(body)).into(),
        }],
        started_ms: 1,
        ended_ms: 2,
        error: String::new(),
        staging: None,
        log: None,
        progress: None,
        worker_key: [0; 32],
        signature: Vec::new(),
    };
    id.sign_result(&mut r);
    r
}

/// An assembled artifact of `shards` shards (two workers) at `<dir>/art`, sealed the
/// way assembly seals one: payload `shard-NNNNN/n`, the provenance file pinned.
fn assembled(dir: &Path, shards: u32) -> PathBuf {
    let ids = [Identity::generate(), Identity::generate()];
    std::fs::create_dir_all(dir).expect("mkdir");
    let out = dir.join("art");
    let tmp = artifact::tmp_path(&out);
    let file = dir.join("prov.jsonl");
    let mut w = ProvenanceWriter::create(&file).expect("create");
    for i in 0..shards {
        let body = format!("{i}\n");
        let r = signed_result(&ids[i as usize % 2], i, body.as_bytes());
        let shard = tmp.join(format!("shard-{i:05}"));
        std::fs::create_dir_all(&shard).expect("mkdir");
        std::fs::write(shard.join("n"), &body).expect("write");
        let text = serde_json::to_string(&Signed::of(&r)).expect("json");
        w.push(i, &text).expect("push");
    }
    std::fs::write(tmp.join("manifest.json"), "{}").expect("manifest");
    let pinned = w.finish().expect("finish");
    let labels = [
        (SHARDS_FILE_LABEL.to_string(), pinned),
        (OUTPUT_LABEL.to_string(), "out".to_string()),
    ]
    .into_iter()
    .collect();
    artifact::seal(
        &out,
        SealRequest {
            kind: "dataset".into(),
            inputs: vec![],
            labels,
            expected: None,
            provenance: Some(file),
        },
    )
    .expect("seal");
    out
}

fn writable(path: &Path) {
    let mut perm = std::fs::metadata(path).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    std::fs::set_permissions(path, perm).expect("chmod");
}

fn edit_meta(out: &Path, f: impl FnOnce(&mut Meta)) {
    let path = out.join(artifact::META);
    writable(&path);
    let mut meta = artifact::read_meta(out).expect("meta");
    f(&mut meta);
    std::fs::write(&path, serde_json::to_vec_pretty(&meta).expect("json")).expect("write");
}

fn edit_lines(out: &Path, f: impl FnOnce(&mut Vec<String>)) -> String {
    let path = out.join(artifact::PROVENANCE);
    writable(&path);
    let text = std::fs::read_to_string(&path).expect("read");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    f(&mut lines);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, &text).expect("write");
    crate::digest::format(&blake3::hash(text.as_bytes()))
}

#[test]
fn an_assembled_artifact_keeps_its_shards_signatures_in_a_pinned_file_not_in_meta_json() {
    let d = tempfile::tempdir().expect("tempdir");
    let out = assembled(d.path(), 5);
    let v = verify_artifact(&out).expect("verifies");
    assert_eq!(v.workers.len(), 2, "both workers' signatures checked");
    let meta = std::fs::read_to_string(out.join(artifact::META)).expect("meta");
    assert!(
        meta.len() < 1024
            && !meta.contains(&format!("\"{SHARDS_LABEL}\""))
            && !meta.contains("signature"),
        "meta.json stays small whatever the shard count: {meta}"
    );
    let lines = std::fs::read_to_string(out.join(artifact::PROVENANCE)).expect("file");
    assert_eq!(lines.lines().count(), 5);
    assert!(lines.starts_with("[0,{"), "{lines}");
    // The file is not payload: the hash is the payload's alone.
    let tree = crate::digest::hash_tree(&out, artifact::NOT_PAYLOAD).expect("tree");
    assert_eq!(tree.files.len(), 6, "five shard files and the manifest");
    assert_eq!(v.meta.hash, tree.digest);
}

#[test]
fn every_change_to_the_provenance_file_is_found_out() {
    let d = tempfile::tempdir().expect("tempdir");
    // A line dropped (with the payload it covered still there).
    let out = assembled(&d.path().join("a"), 4);
    edit_lines(&out, |l| {
        l.remove(2);
    });
    let e = verify_artifact(&out).expect_err("a dropped line");
    assert!(e.to_string().contains("not the provenance file"), "{e}");
    // A forged field, and meta.json's pin moved to match: the signature fails.
    let out = assembled(&d.path().join("b"), 4);
    let pinned = edit_lines(&out, |l| {
        l[1] = l[1].replace("\"generation\":1", "\"generation\":2");
    });
    edit_meta(&out, |m| {
        m.labels.insert(SHARDS_FILE_LABEL.into(), pinned);
    });
    let e = verify_artifact(&out).expect_err("a forged generation");
    assert!(e.to_string().contains("shard 1"), "{e}");
    // The pin removed from meta.json: the file is no longer trusted for anything.
    let out = assembled(&d.path().join("c"), 3);
    edit_meta(&out, |m| {
        m.labels.remove(SHARDS_FILE_LABEL);
    });
    let e = verify_artifact(&out).expect_err("an unpinned file");
    assert!(e.to_string().contains("does not pin"), "{e}");
    // A shard's line moved to another shard's payload: its signed files are not there.
    let out = assembled(&d.path().join("e"), 3);
    let pinned = edit_lines(&out, |l| {
        l[0] = l[0].replacen("[0,", "[2,", 1);
    });
    edit_meta(&out, |m| {
        m.labels.insert(SHARDS_FILE_LABEL.into(), pinned);
    });
    let e = verify_artifact(&out).expect_err("a line claiming another shard");
    assert!(
        e.to_string().contains("not the ones the worker signed"),
        "{e}"
    );
}

#[test]
fn a_worker_cannot_stage_its_own_provenance_file() {
    let d = tempfile::tempdir().expect("tempdir");
    let out = d.path().join("art");
    let tmp = artifact::tmp_path(&out);
    std::fs::create_dir_all(&tmp).expect("mkdir");
    std::fs::write(tmp.join(artifact::PROVENANCE), "[0,{}]\n").expect("write");
    let e = artifact::seal(
        &out,
        SealRequest {
            kind: "dataset".into(),
            inputs: vec![],
            labels: Default::default(),
            expected: None,
            provenance: None,
        },
    )
    .expect_err("refused");
    assert!(e.to_string().contains(artifact::PROVENANCE), "{e}");
}

#[test]
fn a_signed_label_that_is_not_one_json_value_is_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut w = ProvenanceWriter::create(&d.path().join("p")).expect("create");
    assert!(w.push(0, "{\"a\":1} trailing").is_err());
    assert!(w.push(0, "").is_err());
    w.push(0, "{\n\"a\": 1}").expect_err("spans lines");
}
