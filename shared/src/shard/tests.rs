//! The split's tests: copies, ranges, and the two held to the same bytes.

use super::*;

/// The split as it was before it streamed: every record read into memory first
/// (as text lines), then written out part by part.
fn in_memory(input: &str, format: Format, cut: Cut) -> Vec<String> {
    let mut header = None;
    let mut records: Vec<String> = Vec::new();
    for (n, line) in std::io::BufRead::lines(input.as_bytes()).enumerate() {
        let line = line.expect("utf8");
        match format {
            Format::Csv if n == 0 => header = Some(line),
            Format::Fasta => {
                if line.starts_with('>') || records.is_empty() {
                    records.push(line);
                } else if let Some(last) = records.last_mut() {
                    last.push('\n');
                    last.push_str(&line);
                }
            }
            _ => records.push(line),
        }
    }
    if matches!(format, Format::Lines | Format::Csv) {
        while records.last().is_some_and(|r| r.is_empty()) {
            records.pop();
        }
    }
    let weights: Vec<u64> = records.iter().map(|r| r.len() as u64 + 1).collect();
    let mut sizes = cut.sizes(&weights);
    while sizes.len() > 1 && sizes.last() == Some(&0) {
        sizes.pop();
    }
    let mut it = records.into_iter();
    sizes
        .into_iter()
        .map(|n| {
            let mut part = header
                .as_ref()
                .map(|h| format!("{h}\n"))
                .unwrap_or_default();
            for r in it.by_ref().take(n as usize) {
                part.push_str(&r);
                part.push('\n');
            }
            part
        })
        .collect()
}

use proptest::strategy::Strategy as _;

/// Lines of a record file: empty ones, FASTA headers, and text.
fn lines() -> impl proptest::strategy::Strategy<Value = Vec<String>> {
    proptest::collection::vec(
        proptest::prop_oneof![
            proptest::strategy::Just(String::new()),
            proptest::strategy::Just(">h".to_string()),
            "[a-z,]{1,12}",
        ],
        0..40,
    )
}

/// Every kind of cut, small.
fn cuts() -> impl proptest::strategy::Strategy<Value = Cut> {
    proptest::prop_oneof![
        (1u32..9).prop_map(Cut::Count),
        (1u64..9).prop_map(Cut::Records),
        (1u64..60).prop_map(Cut::Bytes),
    ]
}

/// `lines` as a file: `\r\n` or `\n` line ends, a final one or not.
fn text_of(lines: &[String], crlf: bool, final_newline: bool) -> String {
    let end = if crlf { "\r\n" } else { "\n" };
    let mut text = lines.join(end);
    if final_newline && !lines.is_empty() {
        text.push_str(end);
    }
    text
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
    /// Streaming gives the very bytes the in-memory split gave (so cache keys, which
    /// cover each part's digest, do not change), for every format and cut, with
    /// empty lines, CRLF line ends and no final newline.
    #[test]
    fn streaming_splits_are_byte_identical_to_reading_everything_first(
        lines in lines(),
        crlf in proptest::bool::ANY,
        final_newline in proptest::bool::ANY,
        which in 0usize..3,
        cut in cuts(),
    ) {
        let (format, ext) = [(Format::Lines, "txt"), (Format::Csv, "csv"), (Format::Fasta, "fa")][which];
        let text = text_of(&lines, crlf, final_newline);
        let d = tempfile::tempdir().expect("tempdir");
        let input = d.path().join(format!("in.{ext}"));
        fs::write(&input, &text).expect("write");
        let s = split(&input, cut, &d.path().join("s"), Staging::Copies).expect("split");
        let got: Vec<String> = s
            .parts
            .iter()
            .map(|p| fs::read_to_string(&p.path).expect("part"))
            .collect();
        let want = in_memory(&text, format, cut);
        proptest::prop_assert_eq!(got, want);
        for (i, p) in s.parts.iter().enumerate() {
            proptest::prop_assert_eq!(p.index as usize, i);
        }
    }

    /// A range split gives every part the copying split gives, byte for byte: the
    /// same count, names, records and digests (so the same cache keys), and the bytes
    /// a worker is staged from the ranges are the copied part's; inputs whose records
    /// the split rewrites (CRLF, no final newline) are copied instead. For record files
    /// and for a directory holding one (an upstream artifact's payload).
    #[test]
    fn range_shards_are_byte_identical_to_copied_shards(
        lines in lines(),
        crlf in proptest::bool::ANY,
        final_newline in proptest::bool::ANY,
        which in 0usize..3,
        wrapped in proptest::bool::ANY,
        cut in cuts(),
    ) {
        let ext = ["txt", "csv", "fa"][which];
        let text = text_of(&lines, crlf, final_newline);
        let d = tempfile::tempdir().expect("tempdir");
        let file = format!("in.{ext}");
        let input = if wrapped { d.path().join("artifact") } else { d.path().to_path_buf() };
        fs::create_dir_all(&input).expect("mkdir");
        fs::write(input.join(&file), &text).expect("write");
        let input = if wrapped { input } else { input.join(&file) };
        let copied = split(&input, cut, &d.path().join("c"), Staging::Copies).expect("copies");
        let ranged = split(&input, cut, &d.path().join("r"), Staging::Ranges).expect("ranges");
        let verbatim = !text.contains('\r') && (text.is_empty() || text.ends_with('\n'));
        let as_ranges = !(wrapped && cut == Cut::Count(1));
        proptest::prop_assert_eq!(copied.parts.len(), ranged.parts.len());
        for (c, r) in copied.parts.iter().zip(&ranged.parts) {
            proptest::prop_assert_eq!(r.range.is_some(), verbatim && as_ranges);
            proptest::prop_assert_eq!(&c.digest, &r.digest);
            proptest::prop_assert_eq!(c.records, r.records);
            proptest::prop_assert_eq!(c.path.file_name(), r.path.file_name());
            proptest::prop_assert_eq!(c.is_dir(), r.is_dir());
            let staged = d.path().join(format!("staged-{}", r.index));
            r.write_to(&staged).expect("stage");
            proptest::prop_assert_eq!(digest::hash_path(&staged).expect("hash").0, c.digest.clone());
            if let Some(range) = &r.range {
                let mut read = Vec::new();
                std::io::Read::read_to_end(&mut range.reader().expect("open"), &mut read).expect("read");
                let want = if wrapped { staged.join(&file) } else { staged.clone() };
                proptest::prop_assert_eq!(read, fs::read(want).expect("staged"));
            }
        }
    }
}

#[test]
fn a_range_split_writes_only_its_index_and_is_reused_for_the_same_content_anywhere() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("reads.jsonl");
    let text: String = (0..1000).map(|i| format!("{{\"id\": {i}}}\n")).collect();
    fs::write(&input, &text).expect("write");
    let dest = d.path().join("split");
    let s = split(&input, Cut::Records(100), &dest, Staging::Ranges).expect("split");
    assert_eq!(s.parts.len(), 10);
    let names: Vec<_> = fs::read_dir(&dest)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["parts.json"], "no part is written");
    assert_eq!(s.parts[3].path, dest.join("part-00003.jsonl"));
    let r = s.parts[3].range.as_ref().expect("a range");
    assert_eq!(&*r.source, input.as_path());
    let start = text.find("{\"id\": 300}").expect("record 300") as u64;
    let end = text.find("{\"id\": 400}").expect("record 400") as u64;
    assert_eq!(r.spans, vec![(start, end - start)]);
    // The same content elsewhere (the split is named by content): its ranges are read
    // from the input as it is now.
    let moved = d.path().join("moved.jsonl");
    fs::rename(&input, &moved).expect("move");
    let again = split(&moved, Cut::Records(100), &dest, Staging::Ranges).expect("again");
    assert_eq!(
        &*again.parts[3].range.as_ref().expect("range").source,
        moved.as_path()
    );
    assert_eq!(again.parts[3].digest, s.parts[3].digest);
    // A CSV's header is the first span of every part.
    let csv = d.path().join("t.csv");
    fs::write(&csv, "a,b\n1,2\n3,4\n5,6\n").expect("write");
    let s = split(&csv, Cut::Count(2), &d.path().join("csv"), Staging::Ranges).expect("split");
    let spans: Vec<_> = s
        .parts
        .iter()
        .map(|p| p.range.clone().expect("range").spans)
        .collect();
    assert_eq!(spans, vec![vec![(0, 4), (4, 8)], vec![(0, 4), (12, 4)]]);
}

#[test]
fn a_range_whose_input_shrank_is_an_error_naming_it_not_a_short_part() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in.txt");
    fs::write(&input, "a\nb\nc\nd\n").expect("write");
    let s = split(&input, Cut::Count(2), &d.path().join("s"), Staging::Ranges).expect("split");
    fs::write(&input, "a\nb\n").expect("shrink");
    let e = s.parts[1]
        .write_to(&d.path().join("out"))
        .expect_err("short");
    assert!(
        e.to_string().contains("in.txt") && e.to_string().contains("change"),
        "{e}"
    );
    let mut buf = Vec::new();
    let range = s.parts[1].range.as_ref().expect("range");
    let e = std::io::Read::read_to_end(&mut range.reader().expect("open"), &mut buf)
        .expect_err("short");
    assert!(e.to_string().contains("in.txt"), "{e}");
}

#[test]
fn cuts_by_records_and_bytes_keep_record_boundaries() {
    let w = [10, 10, 10, 10, 10, 10, 10];
    assert_eq!(Cut::Records(3).sizes(&w), vec![3, 3, 1]);
    assert_eq!(Cut::Records(7).sizes(&w), vec![7]);
    assert_eq!(Cut::Records(100).sizes(&w), vec![7]);
    assert_eq!(Cut::Count(3).sizes(&w), vec![3, 2, 2]);
    assert_eq!(Cut::Bytes(25).sizes(&w), vec![2, 2, 2, 1]);
    assert_eq!(Cut::Bytes(30).sizes(&w), vec![3, 3, 1]);
    // A record bigger than the limit is a part of its own; none is ever empty.
    assert_eq!(Cut::Bytes(15).sizes(&[5, 40, 5, 5]), vec![1, 1, 2]);
    assert_eq!(Cut::Bytes(15).sizes(&[]), vec![0]);
    assert_eq!(Cut::Records(2).sizes(&[]), vec![0]);
}

#[test]
fn an_input_cut_into_more_than_the_most_shards_is_refused_with_its_name() {
    let d = tempfile::tempdir().expect("tempdir");
    let many = d.path().join("many.txt");
    let lines: String = (0..11).map(|i| format!("{i}\n")).collect();
    std::fs::write(&many, lines).expect("write");
    // As `split` with MAX_SHARDS, on a smaller scale.
    let e = split_bounded(
        &many,
        (Cut::Records(1), Staging::Copies),
        &d.path().join("s"),
        10,
    )
    .expect_err("too many");
    let msg = e.to_string();
    assert!(
        msg.contains("many.txt")
            && msg.contains("shards of 1 records would make more than 10 shards"),
        "{msg}"
    );
    let dest = d.path().join("s");
    assert!(
        !dest.exists() && !crate::artifact::tmp_path(&dest).exists(),
        "nothing left behind"
    );
    let dir = d.path().join("files");
    fs::create_dir_all(&dir).expect("mkdir");
    for i in 0..11 {
        fs::write(dir.join(format!("f{i}")), "x").expect("write");
    }
    let e = split_bounded(
        &dir,
        (Cut::Bytes(1), Staging::Copies),
        &d.path().join("sd"),
        10,
    )
    .expect_err("too many");
    assert!(e.to_string().contains("more than 10 shards"), "{e}");
    assert!(split(&dir, Cut::Bytes(1), &d.path().join("ok"), Staging::Copies).is_ok());
}

#[test]
fn sizes_are_even_and_complete() {
    assert_eq!(part_sizes(10, 4), vec![3, 3, 2, 2]);
    assert_eq!(part_sizes(2, 4), vec![1, 1, 0, 0]);
    assert_eq!(part_sizes(0, 1), vec![0]);
}

#[test]
fn fasta_csv_and_lines_split_by_record() {
    let d = tempfile::tempdir().expect("tempdir");
    let fa = d.path().join("x.fasta");
    fs::write(&fa, ">a\nMK\nLL\n>b\nQQ\n>c\nWW\n").expect("write");
    let s = split(&fa, Cut::Count(2), &d.path().join("s1"), Staging::Copies).expect("split");
    assert_eq!(s.format, Format::Fasta);
    assert_eq!(s.parts.len(), 2);
    assert_eq!(
        fs::read_to_string(&s.parts[0].path).expect("read"),
        ">a\nMK\nLL\n>b\nQQ\n"
    );
    assert_eq!(
        fs::read_to_string(&s.parts[1].path).expect("read"),
        ">c\nWW\n"
    );

    let csv = d.path().join("t.csv");
    fs::write(&csv, "h1,h2\n1,2\n3,4\n5,6\n").expect("write");
    let s = split(&csv, Cut::Count(3), &d.path().join("s2"), Staging::Copies).expect("split");
    assert_eq!(
        fs::read_to_string(&s.parts[2].path).expect("read"),
        "h1,h2\n5,6\n"
    );

    let jl = d.path().join("r.jsonl");
    fs::write(&jl, "{}\n{}\n{}\n").expect("write");
    let s = split(&jl, Cut::Count(2), &d.path().join("s3"), Staging::Copies).expect("split");
    assert_eq!(
        s.parts.iter().map(|p| p.records).collect::<Vec<_>>(),
        vec![2, 1]
    );
    // A second call reuses the finished split.
    let again = split(&jl, Cut::Count(2), &d.path().join("s3"), Staging::Copies).expect("split");
    assert_eq!(again, s);
}

#[test]
fn directories_split_by_file() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    fs::create_dir_all(&input).expect("mkdir");
    for n in ["a", "b", "c"] {
        fs::write(input.join(n), n).expect("write");
    }
    let s = split(&input, Cut::Count(2), &d.path().join("s"), Staging::Copies).expect("split");
    assert_eq!(s.format, Format::Dir);
    assert!(s.parts[0].path.join("a").is_file() && s.parts[0].path.join("b").is_file());
    assert!(s.parts[1].path.join("c").is_file());
}

#[test]
fn a_directory_of_one_record_file_splits_its_records_and_no_shard_is_empty() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("artifact");
    fs::create_dir_all(&input).expect("mkdir");
    fs::write(input.join("seqs.fasta"), ">a\nMK\n>b\nLL\n>c\nQQ\n").expect("write");
    // Sealed, as an upstream step's artifact is: its meta.json and COMPLETE are not
    // records.
    fs::write(input.join("meta.json"), "{}").expect("write");
    fs::write(input.join("COMPLETE"), "").expect("write");
    let s = split(&input, Cut::Count(2), &d.path().join("s"), Staging::Copies).expect("split");
    assert_eq!(s.format, Format::Dir);
    assert_eq!(
        s.parts.iter().map(|p| p.records).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(
        fs::read_to_string(s.parts[0].path.join("seqs.fasta")).expect("read"),
        ">a\nMK\n>b\nLL\n"
    );
    assert_eq!(
        fs::read_to_string(s.parts[1].path.join("seqs.fasta")).expect("read"),
        ">c\nQQ\n"
    );
    // More shards than records: only as many shards as records.
    let s = split(&input, Cut::Count(8), &d.path().join("s8"), Staging::Copies).expect("split");
    assert_eq!(s.parts.len(), 3);
    assert!(s.parts.iter().all(|p| p.records == 1));
    let lines = d.path().join("two.txt");
    fs::write(&lines, "x\ny\n").expect("write");
    let s = split(&lines, Cut::Count(4), &d.path().join("l4"), Staging::Copies).expect("split");
    assert_eq!(s.parts.len(), 2);
    assert!(!d.path().join("l4/part-00002.txt").exists());
    // An empty input still has one (empty) part.
    let empty = d.path().join("empty.txt");
    fs::write(&empty, "").expect("write");
    let s = split(&empty, Cut::Count(4), &d.path().join("e"), Staging::Copies).expect("split");
    assert_eq!(s.parts.len(), 1);
}
