//! Text-level clean-up of an answer before it is parsed: math delimiters, `\boxed`, spacing
//! commands, `\left`/`\right`, `\dfrac`, `\text{}` and units, degrees, currency, thousands
//! separators and trailing punctuation. What is left is plain LaTeX-flavoured math for `expr.rs`.

use super::MAX_DEPTH;

/// The byte range of the `{...}` group opening at `open`, braces balanced; `None` when no
/// group opens there.
pub fn group_end(s: &str, open: usize) -> Option<usize> {
    if !s[open..].starts_with('{') {
        return None;
    }
    let mut depth = 0usize;
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

/// Words that name a unit when they follow a number: `5 cm`, `2 seconds`, `\text{ dollars}`.
fn is_unit_text(t: &str) -> bool {
    let t = t.trim_matches(|c: char| c.is_whitespace() || c == '~' || c == '.');
    !t.is_empty()
        && t.chars()
            .all(|c| c.is_alphabetic() || c == ' ' || c == '/' || c == '-' || c == '.')
}

/// Whether the cleaned text so far ends in a quantity that a unit can follow.
fn ends_in_quantity(out: &str) -> bool {
    out.trim_end()
        .ends_with(|c: char| c.is_ascii_digit() || c == '}' || c == ')')
}

/// Replaces `\text{...}`-like blocks: a unit after a quantity is dropped (with a following `^2`),
/// anything else keeps its content (`\text{(B)}` is `(B)`).
fn strip_text_blocks(s: &str) -> String {
    const BLOCKS: [&str; 7] = [
        "\\text",
        "\\textbf",
        "\\textit",
        "\\textrm",
        "\\mbox",
        "\\mathrm",
        "\\operatorname",
    ];
    let mut out = String::new();
    let mut i = 0;
    let mut after_unit = false;
    while i < s.len() {
        let rest = &s[i..];
        let block = BLOCKS
            .iter()
            .filter(|b| rest.starts_with(**b))
            .max_by_key(|b| b.len());
        let opens = block
            .map(|b| rest[b.len()..].trim_start().starts_with('{'))
            .unwrap_or(false);
        if let (Some(b), true) = (block, opens) {
            let open = i + b.len() + (rest[b.len()..].len() - rest[b.len()..].trim_start().len());
            let Some(close) = group_end(s, open) else {
                out.push_str(rest);
                break;
            };
            let content = &s[open + 1..close];
            i = close + 1;
            let unit = is_unit_text(content)
                && (ends_in_quantity(&out) || after_unit)
                && *b != "\\operatorname";
            if unit {
                after_unit = true;
                // `cm}^2`, `in}^{2}`: the power belongs to the unit.
                i += unit_power_len(&s[i..]);
            } else {
                out.push_str(content);
            }
            continue;
        }
        let c = rest.chars().next().unwrap_or(' ');
        // Separators between unit blocks (`\mathrm{lb} / \mathrm{in}^{2}`) go with them.
        if after_unit && (c.is_whitespace() || c == '/' || c == '~') {
            i += c.len_utf8();
            continue;
        }
        after_unit = false;
        out.push(c);
        i += c.len_utf8();
    }
    out
}

fn unit_power_len(s: &str) -> usize {
    let t = s.trim_start();
    let skipped = s.len() - t.len();
    if let Some(r) = t.strip_prefix('^') {
        if r.starts_with('{') {
            if let Some(end) = group_end(r, 0) {
                return skipped + 1 + end + 1;
            }
        } else if r.starts_with(|c: char| c.is_ascii_digit()) {
            return skipped + 2;
        }
    }
    0
}

/// Rewrites `\frac34`, `\frac9{19}`, `\frac{270}7` and `\sqrt2` with braced arguments; `depth`
/// counts the braced arguments `s` sits in.
fn brace_args(s: &str, depth: usize) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        let (cmd, nargs) = if rest.starts_with("\\frac") {
            ("\\frac", 2)
        } else if rest.starts_with("\\sqrt") && !rest[5..].trim_start().starts_with('[') {
            ("\\sqrt", 1)
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
            continue;
        };
        if rest[cmd.len()..].starts_with(|c: char| c.is_ascii_alphabetic()) {
            // `\fraction`-like longer names are not ours.
            out.push_str(cmd);
            i += cmd.len();
            continue;
        }
        out.push_str(cmd);
        i += cmd.len();
        for _ in 0..nargs {
            let t = &s[i..];
            let lead = t.len() - t.trim_start().len();
            let t = t.trim_start();
            if t.starts_with('{') {
                let end = group_end(t, 0).unwrap_or(t.len() - 1);
                let arg = &t[..=end];
                // Past `MAX_DEPTH` the argument stays as written: too deep to parse anyway.
                if depth < MAX_DEPTH {
                    out.push_str(&brace_args(arg, depth + 1));
                } else {
                    out.push_str(arg);
                }
                i += lead + end + 1;
            } else if let Some(after) = t.strip_prefix('\\') {
                // A command (`\pi`) or one escaped character (`\{`, `\π`), whole.
                let name = after.chars().take_while(char::is_ascii_alphabetic).count();
                let n = 1 + match after.chars().next() {
                    Some(c) if name == 0 => c.len_utf8(),
                    _ => name,
                };
                out.push('{');
                out.push_str(&t[..n]);
                out.push('}');
                i += lead + n;
            } else if let Some(c) = t.chars().next() {
                out.push('{');
                out.push(c);
                out.push('}');
                i += lead + c.len_utf8();
            }
        }
    }
    out
}

/// Removes `\left`, `\right`, `\big` and friends but keeps the delimiter they size.
fn strip_sizing(s: &str) -> String {
    const SIZING: [&str; 10] = [
        "\\left", "\\right", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr", "\\big", "\\Big", "\\biggl",
        "\\biggr",
    ];
    let mut out = String::new();
    let mut i = 0;
    'outer: while i < s.len() {
        for cmd in SIZING {
            if s[i..].starts_with(cmd)
                && !s[i + cmd.len()..].starts_with(|c: char| c.is_ascii_alphabetic())
            {
                i += cmd.len();
                // `\left.` and `\right.` size nothing.
                if s[i..].starts_with('.') {
                    i += 1;
                }
                continue 'outer;
            }
        }
        let c = s[i..].chars().next().unwrap_or(' ');
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// A whole answer written with thousands separators (`1,000`, `32,348.5`, `11, 111, 100`).
fn thousands(s: &str) -> Option<String> {
    let (sign, body) = match s.strip_prefix('-') {
        Some(b) => ("-", b),
        None => ("", s),
    };
    let (int, frac) = match body.split_once('.') {
        Some((a, f)) if !f.is_empty() && f.chars().all(|c| c.is_ascii_digit()) => (a, Some(f)),
        Some(_) => return None,
        None => (body, None),
    };
    let groups: Vec<&str> = int.split(',').map(str::trim).collect();
    let first = groups[0];
    let ok = groups.len() > 1
        && (1..=3).contains(&first.len())
        && !first.starts_with('0')
        && first.chars().all(|c| c.is_ascii_digit())
        && groups[1..]
            .iter()
            .all(|g| g.len() == 3 && g.chars().all(|c| c.is_ascii_digit()));
    ok.then(|| {
        format!(
            "{sign}{}{}",
            groups.concat(),
            frac.map(|f| format!(".{f}")).unwrap_or_default()
        )
    })
}

/// Trailing words after a number (`50 gallons`, `2 seconds`), dropped as units.
fn strip_unit_words(s: &str) -> &str {
    let split = s.find(|c: char| c.is_whitespace());
    if let Some(at) = split {
        let (num, words) = s.split_at(at);
        let numeric = !num.is_empty()
            && num
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | ',' | '/'));
        let wordy = words
            .split_whitespace()
            .all(|w| w.chars().all(char::is_alphabetic));
        if numeric && wordy && !words.trim().is_empty() {
            return num;
        }
    }
    s
}

/// Unwraps the content of the last `\boxed{...}` (or `\fbox{...}`) if the whole text is one.
pub fn unbox(s: &str) -> &str {
    let t = s.trim();
    for cmd in ["\\boxed", "\\fbox"] {
        if let Some(r) = t.strip_prefix(cmd) {
            let r2 = r.trim_start();
            let off = t.len() - r2.len();
            if r2.starts_with('{') && group_end(t, off) == Some(t.len() - 1) {
                return &t[off + 1..t.len() - 1];
            }
        }
    }
    t
}

const ROW_BREAK: &str = "\u{1}";

/// The cleaned form of an answer (gold or extracted), ready for `answer::parse`.
pub fn clean(s: &str) -> String {
    // Row breaks `\\` hide from the one-backslash rules below (`\ ` is a space, `\[` math).
    let mut t = s.trim().replace("\\\\", ROW_BREAK);
    for (from, to) in [
        ("\\$", ""),
        ("$", ""),
        ("\\(", ""),
        ("\\)", ""),
        ("\\[", ""),
        ("\\]", ""),
        ("\\displaystyle", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^{\\circ}", ""),
        ("^{\\circ }", ""),
        ("^\\circ", ""),
        ("\\circ", ""),
        ("\\degree", ""),
        ("°", ""),
        ("\\!", ""),
        ("\\,", " "),
        ("\\;", " "),
        ("\\:", " "),
        ("\\ ", " "),
        ("\\qquad", " "),
        ("\\quad", " "),
        ("~", " "),
        ("\\%", "%"),
    ] {
        t = t.replace(from, to);
    }
    t = strip_sizing(&t);
    t = unbox(&t).to_string();
    t = strip_text_blocks(&t);
    t = brace_args(&t, 0);
    let mut t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    // Trailing punctuation of a sentence: `5.`, `x = 3;`.
    loop {
        let trimmed = t.trim_end_matches(['.', ',', ';', ':', ' ']);
        let trimmed = trimmed.strip_suffix(ROW_BREAK).unwrap_or(trimmed);
        if trimmed.len() == t.len() {
            break;
        }
        t = trimmed.to_string();
    }
    for (words, _) in [("degrees", ()), ("degree", ())] {
        if let Some(r) = t.strip_suffix(words) {
            t = r.trim_end().to_string();
        }
    }
    let t = strip_unit_words(&t).replace(ROW_BREAK, "\\\\");
    thousands(&t).unwrap_or(t)
}
