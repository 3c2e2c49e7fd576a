//! The demo task, tokenizer and model config: determinism, ranges, correct answers, the length
//! gap between long and short completions, and that the project's own loaders read the files.

use thinkshort::config::ModelConfig;
use thinkshort::demo::task::{self, Problem, Style};
use thinkshort::demo::vocab;
use thinkshort::prompt::PromptTemplate;
use thinkshort::tokenizer::Tokenizer;

const SEED: u64 = 1234;
const N: u64 = 200;

/// The question's numbers and operators, parsed independently of the crate.
fn terms(question: &str) -> (i64, Vec<(char, i64)>) {
    let words: Vec<&str> = question.split(' ').collect();
    assert!(words.len() % 2 == 1, "{question}");
    let first = words[0].parse().unwrap();
    let rest = words[1..]
        .chunks(2)
        .map(|c| (c[0].chars().next().unwrap(), c[1].parse().unwrap()))
        .collect();
    (first, rest)
}

/// The partial results of the chain, in order.
fn partials(question: &str) -> Vec<i64> {
    let (mut v, rest) = terms(question);
    rest.iter()
        .map(|&(op, x)| {
            v = match op {
                '+' => v + x,
                '-' => v - x,
                _ => panic!("bad operator {op} in {question}"),
            };
            v
        })
        .collect()
}

/// The integer inside the first "<answer> ... </answer>", parsed locally.
fn extract_answer(text: &str) -> Option<i64> {
    let start = text.find("<answer>")? + "<answer>".len();
    let len = text[start..].find("</answer>")?;
    text[start..start + len].trim().parse().ok()
}

fn demo_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    vocab::write_tokenizer_files(dir.path()).unwrap();
    dir
}

fn prompt(tok: &Tokenizer, p: &Problem, budget: usize) -> String {
    PromptTemplate::plain(task::PROMPT_TEMPLATE)
        .unwrap()
        .render(&p.question, Some(budget), tok)
        .unwrap()
}

#[test]
fn problems_are_deterministic_and_independent_of_the_set() {
    let a = task::problems(SEED, N);
    assert_eq!(a, task::problems(SEED, N));
    // Problem i does not depend on how many others were drawn.
    assert_eq!(task::problem(SEED, 150), a[150]);
    assert_eq!(task::problems(SEED, 10)[..], a[..10]);
    assert_ne!(task::problems(SEED + 1, N), a);
    let distinct: std::collections::HashSet<_> = a.iter().map(|p| &p.question).collect();
    assert!(
        distinct.len() > 190,
        "only {} distinct questions",
        distinct.len()
    );
    for i in 0..N {
        assert_eq!(task::sft_style(SEED, i), task::sft_style(SEED, i));
    }
}

#[test]
fn operands_and_partial_results_are_in_range_and_answers_correct() {
    let mut ops_seen = [0usize; 5];
    let (mut plus, mut minus) = (0, 0);
    for p in task::problems(SEED, 2000) {
        let (first, rest) = terms(&p.question);
        assert!((2..=4).contains(&rest.len()), "{}", p.question);
        ops_seen[rest.len()] += 1;
        assert!((0..=20).contains(&first));
        for &(op, x) in &rest {
            assert!((0..=20).contains(&x), "{}", p.question);
            match op {
                '+' => plus += 1,
                '-' => minus += 1,
                _ => panic!("{}", p.question),
            }
        }
        let partials = partials(&p.question);
        assert!(
            partials.iter().all(|v| (0..=99).contains(v)),
            "{}",
            p.question
        );
        assert_eq!(p.answer, *partials.last().unwrap(), "{}", p.question);
        assert_eq!(p.gold(), p.answer.to_string());
    }
    println!(
        "2000 problems: 2/3/4 operations {:?}, {plus} +, {minus} -",
        &ops_seen[2..]
    );
    // Every chain length and both operators actually occur.
    assert!(ops_seen[2..].iter().all(|&n| n > 200), "{ops_seen:?}");
    assert!(plus > 1000 && minus > 1000, "{plus} + vs {minus} -");
}

#[test]
fn completions_show_each_step_and_the_answer() {
    let p = Problem {
        question: "7 + 5 - 3 + 9".into(),
        answer: 18,
    };
    let steps = "7 + 5 = 12 . 12 - 3 = 9 . 9 + 9 = 18 .";
    let tail = "</think> <answer> 18 </answer>";
    assert_eq!(
        task::sft_completion(&p, Style::Short),
        format!("<think> {steps} {tail}")
    );
    assert_eq!(
        task::sft_completion(&p, Style::Long { checks: 1 }),
        format!("<think> {steps} check : {steps} {tail}")
    );
    assert_eq!(
        task::sft_completion(&p, Style::Long { checks: 2 }),
        format!("<think> {steps} check : {steps} check : {steps} {tail}")
    );
    assert_eq!(
        task::sft_completion(&p, Style::Long { checks: 0 }),
        task::sft_completion(&p, Style::Short)
    );
}

#[test]
fn the_answer_tag_parses_as_the_integer() {
    for (i, p) in task::problems(SEED, N).iter().enumerate() {
        for style in [
            Style::Short,
            Style::Long { checks: 1 },
            task::sft_style(SEED, i as u64),
        ] {
            let text = task::sft_completion(p, style);
            assert_eq!(extract_answer(&text), Some(p.answer), "{text}");
            // The last step of the reasoning states the same number.
            let think = &text[..text.find("</think>").unwrap()];
            assert!(think.ends_with(&format!("= {} . ", p.answer)), "{text}");
        }
    }
    assert_eq!(
        extract_answer("<answer> 7 </answer> <answer> 8 </answer>"),
        Some(7)
    );
    assert_eq!(extract_answer("<answer> x </answer>"), None);
    assert_eq!(extract_answer("<answer> 7"), None);
}

#[test]
fn sft_mix_has_the_documented_proportions() {
    let n = 4000;
    let mut counts = [0usize; 3];
    for i in 0..n {
        match task::sft_style(SEED, i) {
            Style::Short => counts[0] += 1,
            Style::Long { checks } => counts[checks] += 1,
        }
    }
    let frac = counts.map(|c| c as f64 / n as f64);
    for (got, want) in frac.iter().zip([0.15, 0.50, 0.35]) {
        assert!((got - want).abs() < 0.03, "mix {frac:?}");
    }
}

#[test]
fn tokenizer_files_load_with_the_project_loader_and_texts_round_trip() {
    let dir = demo_dir();
    let tok = Tokenizer::from_model_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token_ids(), [vocab::EOS_ID]);
    assert_eq!(tok.pad_token_id(), Some(vocab::EOS_ID));
    assert_eq!(tok.token_to_id(vocab::EOS_TOKEN), Some(0));
    assert_eq!(tok.chat_template(), None);
    assert_eq!(tok.vocab_size(), build_vocab_size());
    let unk = tok.token_to_id(vocab::UNK_TOKEN).unwrap();
    for word in [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "0",
        "199",
        "check",
    ] {
        assert!(tok.token_to_id(word).is_some_and(|id| id != unk), "{word}");
    }

    let round_trip = |text: &str| -> usize {
        let ids = tok.encode(text).unwrap();
        assert!(!ids.contains(&unk), "[UNK] in {text:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
        // EOS is special: skipped on decode, kept otherwise.
        let mut with_eos = ids.clone();
        with_eos.push(vocab::EOS_ID);
        assert_eq!(tok.decode(&with_eos, true).unwrap(), text);
        assert_eq!(
            tok.decode(&with_eos, false).unwrap(),
            format!("{text} {}", vocab::EOS_TOKEN)
        );
        ids.len()
    };

    let (mut prompt_len, mut short_len, mut long_len, mut mix_len) = (0, 0, 0, 0);
    for (i, p) in task::problems(SEED, N).iter().enumerate() {
        for budget in [1, 64, vocab::MAX_NUMBER as usize] {
            round_trip(&prompt(&tok, p, budget));
        }
        prompt_len += round_trip(&prompt(&tok, p, 64));
        // One token per word: the spaced texts split exactly where the tokenizer splits.
        let short = task::sft_completion(p, Style::Short);
        let long = task::sft_completion(p, Style::Long { checks: 1 });
        let mix = task::sft_completion(p, task::sft_style(SEED, i as u64));
        for text in [&short, &long, &mix] {
            assert_eq!(round_trip(text), text.split(' ').count());
        }
        short_len += round_trip(&short);
        long_len += round_trip(&long);
        mix_len += round_trip(&mix);
    }
    let p = task::problem(SEED, 0);
    println!("prompt: {}", prompt(&tok, &p, 64));
    println!("short:  {}", task::sft_completion(&p, Style::Short));
    println!(
        "long:   {}",
        task::sft_completion(&p, Style::Long { checks: 1 })
    );
    let mean = |total: usize| total as f64 / N as f64;
    println!(
        "over {N} problems: mean prompt {:.1} tokens, short {:.1}, long (one check) {:.1}, \
         SFT mix {:.1}; long/short {:.2}, mix/short {:.2}",
        mean(prompt_len),
        mean(short_len),
        mean(long_len),
        mean(mix_len),
        mean(long_len) / mean(short_len),
        mean(mix_len) / mean(short_len),
    );
    assert!(
        long_len as f64 >= 1.6 * short_len as f64,
        "long {long_len} vs short {short_len} tokens"
    );
    // Dropping every check from the SFT mix must leave room for a 40% cut.
    assert!(short_len as f64 <= 0.6 * mix_len as f64);
}

/// Specials (EOS, UNK), the numbers 0..=MAX_NUMBER, and the 13 words of the templates.
fn build_vocab_size() -> usize {
    2 + vocab::MAX_NUMBER as usize + 1 + 13
}

#[test]
fn build_tokenizer_matches_the_written_file() {
    let dir = demo_dir();
    let written = std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap();
    let built = vocab::build_tokenizer();
    assert_eq!(built.get_vocab_size(true), build_vocab_size());
    assert_eq!(written, built.to_string(true).unwrap());
    let enc = built
        .encode("compute : 3 + 4 . budget : 9 tokens .", false)
        .unwrap();
    assert_eq!(enc.get_ids().len(), 11);
}

#[test]
fn tokens_outside_the_vocabulary_are_unknown() {
    let tok = Tokenizer::from_model_dir(demo_dir().path()).unwrap();
    let unk = tok.token_to_id(vocab::UNK_TOKEN).unwrap();
    assert_eq!(
        tok.encode("200 + x").unwrap(),
        [unk, tok.token_to_id("+").unwrap(), unk]
    );
}

#[test]
fn demo_model_config_parses_with_the_project_loader() {
    let tok = Tokenizer::from_model_dir(demo_dir().path()).unwrap();
    let text = vocab::demo_model_config(tok.vocab_size());
    let c = ModelConfig::from_json_str(&text).unwrap();
    assert_eq!(c.vocab_size, tok.vocab_size());
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_layers),
        (128, 384, 4)
    );
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 32));
    assert_eq!((c.rope_theta, c.rms_norm_eps), (10000.0, 1e-6));
    assert_eq!(c.max_position_embeddings, 512);
    assert!(c.tie_word_embeddings && c.qkv_bias);
    let params = c.num_params();
    println!("demo model: {params} parameters");
    assert!((500_000..2_000_000).contains(&params), "{params}");

    // In a folder with the tokenizer files, the config's EOS agrees with the tokenizer's.
    let dir = demo_dir();
    std::fs::write(dir.path().join("config.json"), &text).unwrap();
    assert_eq!(ModelConfig::from_model_dir(dir.path()).unwrap(), c);
    let tok = Tokenizer::from_model_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token_ids(), [vocab::EOS_ID]);
}
