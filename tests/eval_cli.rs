//! `thinkshort eval` and `thinkshort verify` end to end: a tiny fixture model on two items of a
//! real benchmark and of a generic JSONL file, reports on disk, and clear errors for bad lines.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn thinkshort(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thinkshort"))
        .args(args)
        .output()
        .unwrap()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The command failed and its stderr holds every one of `needles`.
#[track_caller]
fn assert_refused(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it succeeded: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "expected {n:?} in: {stderr}");
    }
}

#[test]
fn eval_writes_table_json_markdown_and_items() {
    let dir = tempfile::tempdir().unwrap();
    let generic = dir.path().join("mine.jsonl");
    std::fs::write(
        &generic,
        "{\"question\": \"What is 2+2?\", \"answer\": 4}\n{\"question\": \"Half of 3?\", \"answer\": \"\\\\frac{3}{2}\"}\n{\"question\": \"unused\", \"answer\": \"1\"}\n",
    )
    .unwrap();
    let out_dir = dir.path().join("report");
    let data = root().join("../shared/data");
    let model = root().join("tests/fixtures/qwen2_tied");
    let datasets = format!("gsm8k,{}", path_str(&generic));
    let out = thinkshort(&[
        "eval",
        "--model",
        path_str(&model),
        "--data-dir",
        path_str(&data),
        "--datasets",
        &datasets,
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        path_str(&out_dir),
        "--backend",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| gsm8k | 87 | 2 |"), "{table}");
    assert!(table.contains("| mine | 87 | 2 |"), "{table}");
    assert!(table.contains("| average | 87 | 4 |"), "{table}");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap())
            .unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        let tokens = row["mean_tokens"].as_f64().unwrap();
        assert!((0.0..=4.0).contains(&tokens), "{row}");
        assert!((0.0..=100.0).contains(&row["accuracy"].as_f64().unwrap()));
    }
    let md = std::fs::read_to_string(out_dir.join("results.md")).unwrap();
    assert!(md.contains("| dataset | budget |"), "{md}");
    let items = std::fs::read_to_string(out_dir.join("items.jsonl")).unwrap();
    let items: Vec<Value> = items
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0]["gold"], "18");
    assert_eq!(items[2]["gold"], "4");
    assert_eq!(items[3]["gold"], "\\frac{3}{2}");
    assert!(items.iter().all(|it| it["tokens"].as_u64().unwrap() <= 4));
}

fn bad_data_dir(line2: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("gsm8k")).unwrap();
    let good = r#"{"question": "1+1?", "answer": "1+1=2\n#### 2"}"#;
    std::fs::write(
        dir.path().join("gsm8k/test.jsonl"),
        format!("{good}\n{line2}\n"),
    )
    .unwrap();
    dir
}

#[track_caller]
fn eval_fails_with(data: &Path, expected: &[&str]) {
    let model = root().join("tests/fixtures/qwen2_tied");
    let out = thinkshort(&[
        "eval",
        "--model",
        path_str(&model),
        "--data-dir",
        path_str(data),
        "--datasets",
        "gsm8k",
        "--backend",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for e in expected {
        assert!(stderr.contains(e), "expected {e:?} in: {stderr}");
    }
}

#[test]
fn bad_dataset_lines_name_file_line_and_key() {
    let dir = bad_data_dir("{not json");
    eval_fails_with(dir.path(), &["gsm8k/test.jsonl line 2", "not valid JSON"]);
    let dir = bad_data_dir(r#"{"question": "q"}"#);
    eval_fails_with(
        dir.path(),
        &["gsm8k/test.jsonl line 2", "missing key `answer`"],
    );
    let dir = bad_data_dir(r#"{"question": "q", "answer": "no final answer"}"#);
    eval_fails_with(dir.path(), &["gsm8k/test.jsonl line 2", "####"]);
    // caught before the model loads too: an empty question, an empty gold answer
    let dir = bad_data_dir(r#####"{"question": " ", "answer": "#### 3"}"#####);
    eval_fails_with(
        dir.path(),
        &["gsm8k/test.jsonl line 2", "the question is empty"],
    );
    let dir = bad_data_dir(r#####"{"question": "q", "answer": "#### "}"#####);
    eval_fails_with(
        dir.path(),
        &["gsm8k/test.jsonl line 2", "the answer is empty"],
    );
    let empty = tempfile::tempdir().unwrap();
    eval_fails_with(empty.path(), &["cannot open", "--data-dir"]);
}

#[test]
fn verify_judges_each_line_and_reports_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let input: PathBuf = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        concat!(
            r#"{"id": 1, "response": "<think>half</think> <answer>\\frac{1}{2}</answer>", "gold": "0.5"}"#,
            "\n",
            r#"{"id": "b", "response": "so it is 12.", "gold": 13}"#,
            "\n",
            r#"{"id": 3, "response": "nothing", "gold": "5"}"#,
            "\n"
        ),
    )
    .unwrap();
    let out = thinkshort(&["verify", "--input", path_str(&input)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(
        lines,
        [
            r#"{"id":1,"extracted":"\\frac{1}{2}","correct":true}"#,
            r#"{"id":"b","extracted":"12","correct":false}"#,
            r#"{"id":3,"extracted":null,"correct":false}"#,
        ]
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1/3 correct"));

    std::fs::write(&input, "{\"id\": 1, \"gold\": \"5\"}\n").unwrap();
    let out = thinkshort(&["verify", "--input", path_str(&input)]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in.jsonl line 1") && stderr.contains("`response`"),
        "{stderr}"
    );
}

#[test]
fn several_budgets_give_rows_per_budget_and_a_frontier_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("frontier");
    let data = root().join("../shared/data");
    let model = root().join("tests/fixtures/qwen2_tied");
    let out = thinkshort(&[
        "eval",
        "--model",
        path_str(&model),
        "--data-dir",
        path_str(&data),
        "--datasets",
        "gsm8k,svamp",
        "--limit",
        "1",
        "--budgets",
        "4,8",
        "--max-new-tokens",
        "3",
        "--out",
        path_str(&out_dir),
        "--backend",
        "cpu",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap())
            .unwrap();
    let budgets: Vec<u64> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["budget"].as_u64().unwrap())
        .collect();
    assert_eq!(
        budgets,
        [4, 4, 4, 8, 8, 8],
        "two sets and their average at each budget"
    );
    let png = std::fs::read(out_dir.join("frontier.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

/// `--stop` ends each response at the stop string (kept): with the demo model, whose greedy
/// answers are "<think> … </think> <answer> … </answer>", a stop at "</think>" gives the start
/// of the same response, finished rather than truncated, with fewer tokens.
#[test]
fn stop_strings_end_the_responses() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sums.jsonl");
    std::fs::write(
        &data,
        "{\"question\": \"compute : 3 + 4 . budget : 20 tokens .\", \"answer\": 7}\n\
         {\"question\": \"compute : 9 - 2 + 6 . budget : 30 tokens .\", \"answer\": 13}\n",
    )
    .unwrap();
    let model = root().join("models/demo");
    let items = |stop: &[&str]| -> Vec<Value> {
        let out_dir = dir.path().join(format!("report{}", stop.len()));
        let mut args = vec![
            "eval",
            "--model",
            path_str(&model),
            "--datasets",
            path_str(&data),
            "--template",
            "raw",
            "--max-new-tokens",
            "64",
            "--out",
            path_str(&out_dir),
            "--backend",
            "cpu",
        ];
        for s in stop {
            args.extend(["--stop", s]);
        }
        let out = thinkshort(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(out_dir.join("items.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let free = items(&[]);
    let stopped = items(&["</think>"]);
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("report1/results.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["stop"], serde_json::json!(["</think>"]));
    assert_eq!(free.len(), 2);
    for (f, s) in free.iter().zip(&stopped) {
        let (f_text, s_text) = (
            f["response"].as_str().unwrap(),
            s["response"].as_str().unwrap(),
        );
        assert!(f_text.contains("<answer>"), "{f_text}");
        assert!(s_text.ends_with("</think>"), "{s_text}");
        assert!(f_text.starts_with(s_text), "{s_text} vs {f_text}");
        assert!(s["tokens"].as_u64() < f["tokens"].as_u64());
        assert_eq!(s["truncated"], false);
    }
    let out = thinkshort(&[
        "eval",
        "--model",
        path_str(&model),
        "--datasets",
        path_str(&data),
        "--stop",
        "",
        "--backend",
        "cpu",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stop string is empty"), "{stderr}");
}

/// `--baseline DIR` compares with an earlier evaluation item by item: a baseline whose first
/// three svamp verdicts are flipped (greedy evaluation repeats exactly) gives, for svamp, as many
/// items "became right" as were wrong among those three and "became wrong" as were right, with
/// the paired interval; the other set and budget did not change. The comparison lands in
/// results.json too; a baseline folder without items.jsonl, or one judging other items, is an
/// error naming it.
#[test]
fn eval_compares_with_a_baseline_item_by_item() {
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("../shared/data");
    let model = root().join("tests/fixtures/qwen2_tied");
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            path_str(&model),
            "--data-dir",
            path_str(&data),
            "--datasets",
            "svamp,gsm8k",
            "--limit",
            "6",
            "--max-new-tokens",
            "4",
            "--backend",
            "cpu",
        ];
        args.extend_from_slice(extra);
        thinkshort(&args)
    };
    let first = dir.path().join("first");
    let out = eval(&["--out", path_str(&first)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut items: Vec<Value> = std::fs::read_to_string(first.join("items.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(items[0]["dataset"], "svamp");
    let now_right = items[..3].iter().filter(|i| i["correct"] == true).count();
    for item in &mut items[..3] {
        item["correct"] = Value::Bool(item["correct"] != true);
    }
    let baseline = dir.path().join("baseline");
    std::fs::create_dir_all(&baseline).unwrap();
    let lines: String = items.iter().map(|i| format!("{i}\n")).collect();
    std::fs::write(baseline.join("items.jsonl"), lines).unwrap();

    let second = dir.path().join("second");
    let out = eval(&[
        "--baseline",
        path_str(&baseline),
        "--out",
        path_str(&second),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let svamp = format!("| svamp | 87 | 6 | {now_right} | {} |", 3 - now_right);
    assert!(table.contains(&svamp), "{svamp}\n{table}");
    assert!(
        table.contains("| gsm8k | 87 | 6 | 0 | 0 | +0.0 | no item changed |"),
        "{table}"
    );
    // both sets' items pooled
    let all = format!("| all | 87 | 12 | {now_right} | {} |", 3 - now_right);
    assert!(table.contains(&all), "{all}\n{table}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(second.join("results.json")).unwrap())
            .unwrap();
    let change = &report["paired"][0]["change"];
    assert_eq!(change["problems"], 6);
    assert_eq!(change["gained"].as_u64().unwrap() as usize, now_right);

    assert_refused(
        &eval(&["--baseline", path_str(&second.join("missing"))]),
        &["missing/items.jsonl"],
    );
    assert_refused(
        &eval(&["--baseline", path_str(&baseline), "--budget", "30"]),
        &["judged none of these sets' items"],
    );

    // Items told apart by (set, id, budget) must be so: a baseline judging an item twice, a
    // set listed twice, a budget listed twice are errors (they were matched arbitrarily).
    let twice = dir.path().join("twice");
    std::fs::create_dir_all(&twice).unwrap();
    let lines: String = items
        .iter()
        .chain(&items[..1])
        .map(|i| format!("{i}\n"))
        .collect();
    std::fs::write(twice.join("items.jsonl"), lines).unwrap();
    let line = format!("twice/items.jsonl line {}", items.len() + 1);
    assert_refused(
        &eval(&["--baseline", path_str(&twice)]),
        &[&line, "judged twice"],
    );
    assert_refused(
        &thinkshort(&[
            "eval",
            "--model",
            path_str(&model),
            "--data-dir",
            path_str(&data),
            "--datasets",
            "svamp,svamp",
            "--backend",
            "cpu",
        ]),
        &["both named `svamp`"],
    );
    assert_refused(
        &eval(&["--budgets", "30,40,30"]),
        &["--budgets lists 30 twice"],
    );
    // --budget beside --budgets was dropped without a word
    assert_refused(
        &eval(&["--budgets", "30,40", "--budget", "50"]),
        &["cannot be used with"],
    );
}

/// A generic JSONL file whose items share an id cannot be compared item by item: an error
/// naming the file, the line and the id.
#[test]
fn items_sharing_an_id_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mine.jsonl");
    std::fs::write(
        &file,
        "{\"question\": \"q\", \"answer\": 1, \"id\": \"a\"}\n{\"question\": \"r\", \"answer\": 2, \"id\": \"a\"}\n",
    )
    .unwrap();
    let model = root().join("tests/fixtures/qwen2_tied");
    assert_refused(
        &thinkshort(&[
            "eval",
            "--model",
            path_str(&model),
            "--datasets",
            path_str(&file),
            "--backend",
            "cpu",
        ]),
        &["mine.jsonl line 2", "id `a` is line 1's too"],
    );
}
