//! README.md documents every option users see: each command's flags (as its `--help` lists
//! them) in that command's section, and each training setting (as the resolved config.toml
//! writes it) in the settings table of `thinkshort train`.

use std::path::Path;
use std::process::Command;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The README text from the heading "### `thinkshort <command>`" to the next heading of that
/// level or above.
fn section<'a>(readme: &'a str, command: &str) -> &'a str {
    let heading = format!("### `thinkshort {command}`");
    let start = readme
        .find(&heading)
        .unwrap_or_else(|| panic!("README has no section {heading}"));
    let body = &readme[start + heading.len()..];
    let end = [body.find("\n### "), body.find("\n## ")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(body.len());
    &body[..end]
}

/// The long flags of a command's `--help` (its option lines), without --help and --version.
fn flags(command: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_thinkshort"))
        .args(command)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{command:?} --help failed");
    let help = String::from_utf8(out.stdout).unwrap();
    let mut found = Vec::new();
    for line in help.lines() {
        let line = line.trim_start();
        // option lines start with "-x, --name" or "--name"
        let Some(pos) = line.find("--").filter(|&p| line.starts_with('-') && p <= 4) else {
            continue;
        };
        let name: String = line[pos + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if !["help", "version"].contains(&name.as_str()) && !found.contains(&name) {
            found.push(name);
        }
    }
    found
}

#[test]
fn every_command_option_is_documented() {
    let readme = readme();
    let commands: [&[&str]; 10] = [
        &["generate"],
        &["logprobs"],
        &["train"],
        &["sft"],
        &["eval"],
        &["verify"],
        &["doctor"],
        &["selfcheck"],
        &["bench", "forward"],
        &["bench", "step"],
    ];
    let mut missing = Vec::new();
    for command in commands {
        let name = command.join(" ");
        let text = section(&readme, &name);
        let listed = flags(command);
        assert!(!listed.is_empty(), "no options parsed from `{name} --help`");
        for flag in listed {
            if !text.contains(&format!("--{flag}")) {
                missing.push(format!("{name} --{flag}"));
            }
        }
    }
    assert!(missing.is_empty(), "options not in README: {missing:?}");
}

/// Every key of the demo's resolved config (all settings but `model` and `data`, which it leaves
/// out) is in a row of the settings table: a top-level key as a backticked name, a key of table
/// `t` among the backticked names after "`[t]`" in a row's first cell. The schedule's row names
/// its parameters in words.
#[test]
fn every_training_setting_is_documented() {
    let readme = readme();
    let train = section(&readme, "train");
    let rows: Vec<&str> = train.lines().filter(|l| l.starts_with("| `")).collect();
    let config = thinkshort::commands::train::demo_config().to_toml_string();
    let table: toml::Table = config.parse().unwrap();
    let mut keys = Vec::new();
    collect_keys(&table, "", &mut keys);
    assert!(
        keys.len() > 40,
        "only {} keys in the demo config",
        keys.len()
    );
    let mut missing = Vec::new();
    for (table_name, key) in &keys {
        let documented = rows.iter().any(|row| {
            let first_cell = row.split(" | ").next().unwrap_or("");
            if table_name.is_empty() {
                !first_cell.starts_with("| `[") && first_cell.contains(&format!("`{key}`"))
            } else if table_name == "schedule" {
                first_cell.starts_with("| `[schedule]`") && row.contains(key.as_str())
            } else {
                // the key among the names after "`[t]`", up to the next table's name
                first_cell
                    .split_once(&format!("`[{table_name}]`"))
                    .map(|(_, after)| after.split("`[").next().unwrap_or(""))
                    .is_some_and(|names| names.contains(&format!("`{key}`")))
            }
        });
        if !documented {
            missing.push(if table_name.is_empty() {
                key.clone()
            } else {
                format!("{table_name}.{key}")
            });
        }
    }
    assert!(
        missing.is_empty(),
        "settings not in README's table: {missing:?}"
    );
}

/// (table path, key) of every value that is not itself a table.
fn collect_keys(table: &toml::Table, path: &str, out: &mut Vec<(String, String)>) {
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) => {
                let inner_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                collect_keys(inner, &inner_path, out);
            }
            _ => out.push((path.to_string(), key.clone())),
        }
    }
}

/// The README's table of memory estimates (128 completions of ≤ 512 tokens after a 200-token
/// prompt, β > 0) is what `TrainMemory::estimate` and the automatic micro-batch choice give for
/// each row's model (tools/model_configs/) and settings, every cell as the README writes it.
#[test]
fn the_memory_table_is_what_the_estimate_gives() {
    use thinkshort::config::ModelConfig;
    use thinkshort::train::memory::{micro_batch, RunShape, TrainMemory};
    const GIB: f64 = (1u64 << 30) as f64;
    let gib = |bytes: usize| format!("{:.1} GiB", bytes as f64 / GIB);
    let readme = readme();
    let header = "| model | weights + reference | optimizer (f32 master, moments, gradient) | one \
                  pass | 78 GiB free (H100) | 139 GiB free (H200) |";
    let start = readme.find(header).expect("README has the memory table");
    let rows: Vec<&str> = readme[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(rows.len() >= 9, "{rows:?}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for row in rows {
        let label = row.split(" | ").next().unwrap().trim_start_matches("| ");
        let model = label.split(',').next().unwrap();
        let path = root.join(format!("tools/model_configs/{}.json", model.to_lowercase()));
        let cfg = ModelConfig::from_json_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let (offload, checkpoint) = (
            label.contains("`optim.offload`"),
            label.contains("`activation_checkpointing`"),
        );
        let estimate = |micro_batch| {
            let shape = RunShape {
                sequences: 128,
                prompts: 16,
                micro_batch,
                prompt_len: 200,
                cap: 512,
                eval_sequences: 0,
                eval_cap: 0,
                reference: true,
                offload,
                checkpoint_layers: checkpoint,
            };
            TrainMemory::estimate(&cfg, 2, thinkshort::model::HEAD_CHUNK_BYTES, &shape)
        };
        let one = estimate(0);
        let optimizer = if offload {
            format!("{} (+ {} host)", gib(one.optimizer), gib(one.host))
        } else {
            gib(one.optimizer)
        };
        let mut want = format!(
            "| {label} | {} | {optimizer} | {} |",
            gib(one.weights),
            gib(one.total())
        );
        for free_gib in [78usize, 139] {
            let free = free_gib << 30;
            let room = free - free / 10; // what `train` leaves the automatic choice
            let mb = micro_batch(0, 128, Some(room), estimate);
            let plan = estimate(mb);
            want += &match 128usize.div_ceil(mb) {
                _ if plan.total() > room => " does not fit |".to_string(),
                1 => format!(" 1 pass, {} |", gib(plan.total())),
                passes => format!(" {passes} passes of {mb}, {} |", gib(plan.total())),
            };
        }
        assert_eq!(row, want, "README's row for {label}");
    }
}
