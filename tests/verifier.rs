//! The answer verifier: hand-picked equivalences and non-equivalences (issue 7), extraction,
//! answers nested too deeply to read, and every gold answer of the five benchmarks against
//! itself, a rewritten equivalent and a perturbed answer.

use std::path::{Path, PathBuf};
use thinkshort::datasets::{self, BENCHMARKS};
use thinkshort::verify::{answers_match, extract_answer, verify, ExtractOptions};

#[track_caller]
fn same(a: &str, b: &str) {
    assert!(answers_match(a, b), "{a:?} should match gold {b:?}");
    assert!(answers_match(b, a), "{b:?} should match gold {a:?}");
}

#[track_caller]
fn differ(a: &str, b: &str) {
    assert!(!answers_match(a, b), "{a:?} should not match gold {b:?}");
    assert!(!answers_match(b, a), "{b:?} should not match gold {a:?}");
}

#[test]
fn numbers() {
    same("0.5", "\\frac{1}{2}");
    same("1,000", "1000");
    same("10,\\!080", "10080");
    same("\\$32,\\!348", "32348");
    same("11,\\! 111,\\! 111,\\! 100", "11111111100");
    same("145.0", "145");
    same("3.0", "3");
    same("-3", "−3");
    same("\\frac13", "0.333333");
    same("1.25", "\\dfrac{5}{4}");
    same("\\tfrac{3}{4}", "3/4");
    same("50\\%", "0.5");
    same("50%", "50");
    same("\\$18.90", "18.9");
    same("18 dollars", "18");
    same("1.2e3", "1200");
    same("1.2 \\times 10^{3}", "1200");
    same("2^{10}", "1024");
    same(".35625", "0.35625");
    differ("4.33", "4.333");
    differ("\\frac13", "0.333");
    differ("5", "-5");
    differ("1000", "100");
    differ("0.5", "\\frac{1}{3}");
}

#[test]
fn latex_forms() {
    same("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)");
    same("\\frac 34", "\\frac{3}{4}");
    same("\\frac9{19}", "9/19");
    same("11\\sqrt2", "11 \\sqrt{2}");
    same("\\sqrt{2}/2", "\\frac{1}{\\sqrt2}");
    same("\\sqrt[3]{8}", "2");
    same("30^\\circ", "30");
    same("120^{\\circ}", "120 degrees");
    same("5.4 \\text{ cents}", "5.4");
    same("15\\mbox{ cm}^2", "15");
    same("\\frac{270}7\\text{ degrees}", "270/7");
    same("\\text{(B)}", "B");
    same("\\text{Evelyn}", "evelyn");
    same("12\\pi", "12 \\pi");
    same("-2 + 7i", "7i - 2");
    same("2k+2", "2(k+1)");
    same("\\cot x", "\\cos x/\\sin x");
    same("5.", "5");
    same("\\boxed{5}", "5");
    same("204_5", "204_{5}");
    differ("\\text{(B)}", "\\text{(C)}");
    differ("12\\pi", "12");
    differ("\\sqrt{5}", "\\sqrt{6}");
    differ("\\text{east}", "\\text{west}");
}

#[test]
fn structures() {
    same("x=5", "5");
    same("y = 2x + 3", "2x+3");
    same("5x - 7y + 11z + 4 = 0", "-5x + 7y - 11z - 4 = 0");
    same(
        "(-\\infty, 2) \\cup (3, \\infty)",
        "(3,\\infty) \\cup (-\\infty,2)",
    );
    same("x \\in [-2,7]", "[-2, 7]");
    same("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1-\\sqrt5, 1+\\sqrt5");
    same("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}");
    same("-2,1", "1,-2");
    same(
        "\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}",
        "\\begin{pmatrix} 0.2 \\\\ -3.6 \\end{pmatrix}",
    );
    same(
        "\\left[\\begin{array}{rr}1 & 2 \\\\ 3 & 4\\end{array}\\right]",
        "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}",
    );
    differ("(1,2)", "(2,1)");
    differ("[1,2]", "(1,2)");
    differ("(3,4]", "(3,4)");
    differ("1,2", "1,2,3");
    differ("x=5", "x=6");
    differ(
        "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
        "\\begin{pmatrix} -1 & 0 \\\\ 0 & -2 \\end{pmatrix}",
    );
    // A matrix is not its last entry, nor a scalar that every entry equals (the environment's
    // name, or an array's column spec, read as prose made the last number decide).
    differ("\\begin{pmatrix}2&3\\end{pmatrix}", "3");
    differ("\\begin{pmatrix}2&2\\end{pmatrix}", "2");
    differ("\\begin{bmatrix}1\\\\1\\end{bmatrix}", "1");
    differ("\\begin {pmatrix} 1 \\end {pmatrix}", "(1)");
    differ("\\begin{array}{ccc}1&2&3\\end{array}", "3");
    differ("\\left[\\begin{array}{rrr}1&2&3\\end{array}\\right]", "3");
    // other environments are judged as prose is, by their last number
    for answer in [
        "\\begin{aligned} x &= 5 \\end{aligned}",
        "x = \\begin{cases} 5 \\end{cases}",
    ] {
        assert!(answers_match(answer, "5"), "{answer}");
    }
}

#[test]
fn symbolic() {
    same("x^3+3x-6", "3x+x^3-6");
    same("(a+5)(b+2)", "ab + 2a + 5b + 10");
    same("\\frac{11+9a}{20}", "0.55 + 0.45a");
    same("\\ln(x^2) ", "2\\ln x");
    same("\\sin^2 x + \\cos^2 x", "1");
    same("8n^2 + 4n + 1", "4n(2n+1)+1");
    differ("x^3+3x-6", "x^3+3x+6");
    differ("p - q", "q - p");
    differ("2k", "2k+2");
}

#[test]
fn extraction() {
    let all = ExtractOptions::default();
    let tags_only = ExtractOptions {
        boxed_fallback: false,
        number_fallback: false,
    };
    let r = "<think>3+4=7, or \\boxed{8}</think> <answer>7</answer> <answer>9</answer>";
    assert_eq!(extract_answer(r, &all).as_deref(), Some("7"));
    assert_eq!(
        extract_answer("<answer>\\boxed{\\frac{1}{2}}</answer>", &all).as_deref(),
        Some("\\frac{1}{2}")
    );
    let boxed = "so \\boxed{2} then \\boxed{\\frac{1}{2}} done 17";
    assert_eq!(extract_answer(boxed, &all).as_deref(), Some("\\frac{1}{2}"));
    assert_eq!(extract_answer(boxed, &tags_only), None);
    let number = "we get 1,234 apples and then -5.5 pears.";
    assert_eq!(extract_answer(number, &all).as_deref(), Some("-5.5"));
    let no_number = ExtractOptions {
        boxed_fallback: true,
        number_fallback: false,
    };
    assert_eq!(extract_answer(number, &no_number), None);
    assert_eq!(extract_answer("<answer>unterminated", &tags_only), None);
    let v = verify(
        "<think>..</think> <answer>The answer is 1,000.</answer>",
        "1000",
        &all,
    );
    assert!(v.correct, "{v:?}");
    let v = verify("no answer here", "5", &all);
    assert_eq!((v.extracted, v.correct), (None, false));
}

/// Every construct the verifier recurses through: the form with `@` for the nested part, the
/// innermost value, and whether the form nested (an even number of levels) equals that value. A
/// tuple or a matrix never does.
const NESTED: [(&str, &str, bool); 20] = [
    ("(@)", "1", true),
    ("{@}", "1", true),
    ("\\left[@\\right]", "1", true),
    ("\\frac{@}{1}", "2", true),
    ("\\frac{@}1", "2", true),
    ("\\sqrt{@}", "1", true),
    ("\\sqrt[3]{@}", "1", true),
    ("|@|", "1", true),
    ("-@", "1", true),
    ("1^@", "1", true),
    ("\\sin(@)", "0", true),
    ("\\sin @", "0", true),
    ("@!", "1", true),
    ("0 + @", "1", true),
    ("2 \\cdot @ / 2", "1", true),
    ("x = @", "1", true),
    ("x \\in @", "1", true),
    ("\\{@\\}", "1", true),
    ("(@, 1)", "1", false),
    ("\\begin{pmatrix}@\\end{pmatrix}", "1", false),
];

/// `form` wrapped `levels` times around `inner`.
fn nest(form: &str, inner: &str, levels: usize) -> String {
    let (before, after) = form.split_once('@').unwrap();
    format!("{}{inner}{}", before.repeat(levels), after.repeat(levels))
}

fn tagged(answer: &str) -> String {
    format!("<answer>{answer}</answer>")
}

#[test]
fn moderately_nested_answers() {
    let opts = ExtractOptions::default();
    for (form, inner, keeps_value) in NESTED {
        let a = nest(form, inner, 20);
        let b = nest(form, &format!("{inner}.0"), 20);
        same(&a, &b);
        assert!(verify(&tagged(&a), &b, &opts).correct, "{a}");
        if keeps_value {
            same(&a, inner);
        }
    }
}

#[test]
fn answers_nested_too_deeply_are_not_read() {
    // Far past the nesting limit (100 levels): the verifier recursed once per level, overflowed
    // the stack and aborted the process; now it reads such text as text it cannot parse.
    let opts = ExtractOptions::default();
    for (form, inner, keeps_value) in NESTED {
        let a = nest(form, inner, 10_000);
        let b = nest(form, &format!("{inner}.0"), 10_000);
        differ(&a, &b);
        assert!(!verify(&tagged(&a), &b, &opts).correct, "{form}");
        if keeps_value {
            differ(&a, inner);
            assert!(!verify(&tagged(&a), inner, &opts).correct, "{form}");
            assert!(!verify(&tagged(inner), &a, &opts).correct, "{form}");
        }
    }
    let parens = nest("(@)", "1", 30_000);
    assert!(!verify(&tagged(&parens), "1", &opts).correct);
    // Each `\pm` doubles the values: 40 of them were 2^40 parses.
    differ(&format!("1{}", " \\pm 1".repeat(40)), "1");
    same("1 \\pm 0 \\pm 0", "1, 1, 1, 1");
}

/// Values past f64's range are not all equal (each overflows to ∞): they match when they are the
/// same expression (inside a relation or a set too), while infinity itself still matches itself
/// however it is written.
#[test]
fn numbers_beyond_f64_are_not_infinity() {
    differ("10^{400}", "10^{401}");
    same("x = 10^{400}", "10^{400}");
    same("\\{1, 10^{400}\\}", "\\{10^{400}, 1\\}");
    differ("2^{2000}", "\\infty");
    differ("-10^{400}", "-\\infty");
    same("\\infty", "∞");
    same("-\\infty", "-∞");
    same("(-\\infty, 2]", "(-∞, 2]");
}

#[test]
fn malformed_latex_gets_a_verdict() {
    // An escaped non-ASCII character as a `\frac` argument was cut inside its bytes (a panic);
    // an array without its column spec underflowed a brace count.
    differ("\\frac\\π2", "2");
    differ("\\sqrt\\é", "1");
    differ("\\begin{array}}1\\end{array}", "2");
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

/// A plain decimal number, e.g. `-12`, `4.33`.
fn plain_number(s: &str) -> bool {
    let t = s.strip_prefix('-').unwrap_or(s);
    !t.is_empty()
        && t.chars().all(|c| c.is_ascii_digit() || c == '.')
        && t.matches('.').count() <= 1
}

/// An equivalent written differently: numbers with thousands separators, `.0` or as a fraction;
/// LaTeX with `\frac{a}{b}` as `(a)/(b)`; otherwise `None`.
fn rewrite(gold: &str) -> Option<String> {
    if plain_number(gold) {
        let (sign, t) = gold.strip_prefix('-').map_or(("", gold), |t| ("-", t));
        return Some(match t.split_once('.') {
            None if t.len() > 3 => {
                let digits: Vec<char> = t.chars().collect();
                let mut out = String::new();
                for (i, c) in digits.iter().enumerate() {
                    if i > 0 && (digits.len() - i).is_multiple_of(3) {
                        out.push(',');
                    }
                    out.push(*c);
                }
                format!("{sign}{out}")
            }
            None => format!("{sign}{t}.0"),
            Some((int, frac)) => {
                format!("{sign}\\frac{{{int}{frac}}}{{1{}}}", "0".repeat(frac.len()))
            }
        });
    }
    let at = gold.find("\\frac{")?;
    let open1 = at + "\\frac".len();
    let close1 = brace_end(gold, open1)?;
    let close2 = brace_end(gold, close1 + 1)?;
    Some(format!(
        "{}({})/({}){}",
        &gold[..at],
        &gold[open1 + 1..close1],
        &gold[close1 + 2..close2],
        &gold[close2 + 1..]
    ))
}

fn brace_end(s: &str, open: usize) -> Option<usize> {
    if s.as_bytes().get(open) != Some(&b'{') {
        return None;
    }
    let mut depth = 0;
    for (i, c) in s[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The same text laid out differently: math delimiters, spacing around `=`, a final period.
fn respace(gold: &str) -> String {
    format!("$ {} $.", gold.replace('=', " = "))
}

/// Wrong answers: the number plus one; else the first and the last digit changed (`x^2+3` to
/// `x^2+4`); else the negation. Digits of a subscript or superscript are left alone: `204_5`
/// (base 5) reads as 204, like math-verify reads it, and `cm^2` is a unit.
fn perturb(gold: &str) -> Vec<String> {
    if plain_number(gold) {
        let x: f64 = gold.parse().unwrap();
        return vec![format!("{}", x + 1.0)];
    }
    let in_script = |at: usize| {
        let before = &gold[..at];
        ["_", "^", "_{", "^{"].iter().any(|p| before.ends_with(p))
    };
    let digits: Vec<usize> = gold
        .char_indices()
        .filter(|&(i, c)| c.is_ascii_digit() && !in_script(i))
        .map(|(i, _)| i)
        .collect();
    if digits.is_empty() {
        return vec![format!("-({gold})")];
    }
    [digits[0], digits[digits.len() - 1]]
        .iter()
        .map(|&at| {
            let d = gold.as_bytes()[at] - b'0';
            format!("{}{}{}", &gold[..at], (d + 1) % 10, &gold[at + 1..])
        })
        .collect()
}

#[test]
fn gold_answers_of_all_five_sets() {
    let opts = ExtractOptions::default();
    for name in BENCHMARKS {
        for set in datasets::load(name, &data_dir()).unwrap() {
            let (mut rewritten, mut failures, mut not_rewritten) = (0, Vec::new(), Vec::new());
            for item in &set.items {
                let g = item.gold.as_str();
                let response = |a: &str| format!("<think>solving</think> <answer>{a}</answer>");
                let own = verify(&response(g), g, &opts);
                if !own.correct {
                    failures.push(format!("itself: {g:?} {own:?}"));
                }
                if !answers_match(&respace(g), g) {
                    failures.push(format!("respaced: {:?} vs {g:?}", respace(g)));
                }
                if let Some(r) = rewrite(g) {
                    if verify(&response(&r), g, &opts).correct {
                        rewritten += 1;
                    } else {
                        not_rewritten.push(format!("rewritten: {r:?} vs {g:?}"));
                    }
                }
                // A changed digit can keep the value (`\\cos\\frac{20\\pi}{3}` is
                // `\\cos\\frac{10\\pi}{3}`; a tenth decimal is below the tolerance), so one of
                // the two perturbations must be rejected.
                let p = perturb(g);
                if p.iter().all(|p| verify(&response(p), g, &opts).correct) {
                    failures.push(format!("perturbed: {p:?} vs {g:?}"));
                }
            }
            eprintln!(
                "{}: {} golds; {} of {} rewritten numbers or fractions verified",
                set.name,
                set.items.len(),
                rewritten,
                rewritten + not_rewritten.len()
            );
            // College Math golds include prose, series and ODE solutions that no verifier
            // (math-verify included) reads as one value; the other four sets must all pass.
            let allowed = if set.name == "college_math" {
                (rewritten + not_rewritten.len()) / 5
            } else {
                0
            };
            assert!(
                not_rewritten.len() <= allowed,
                "{}: {} rewritten equivalents failed:\n{}",
                set.name,
                not_rewritten.len(),
                not_rewritten.join("\n")
            );
            assert!(
                failures.is_empty(),
                "{}: {} failures:\n{}",
                set.name,
                failures.len(),
                failures.join("\n")
            );
        }
    }
}
