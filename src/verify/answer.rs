//! The shape of an answer (a number or expression, an equation, a tuple or interval, a set or
//! list, a union of intervals, a matrix, or plain text) and when two answers are equivalent.

use super::expr::{self, Expr};
use super::numeric::{close, C};
use super::MAX_DEPTH;
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Expr(Expr),
    Rel {
        lhs: Box<Answer>,
        op: &'static str,
        rhs: Box<Answer>,
    },
    /// `(a, b)`, `[a, b)`: tuples and intervals; the brackets must agree.
    Seq {
        open: char,
        close: char,
        items: Vec<Answer>,
    },
    /// `\{a, b\}`, a bare `a, b` list, or the two values of `a \pm b`: order does not matter.
    Set(Vec<Answer>),
    Union(Vec<Answer>),
    Matrix(Vec<Vec<Answer>>),
    Text(String),
}

/// Relations, longest spelling first so `\leq` is not read as `\le` followed by `q`.
const RELATIONS: [(&str, &str); 12] = [
    ("\\leq", "<="),
    ("\\geq", ">="),
    ("\\neq", "!="),
    ("\\le", "<="),
    ("\\ge", ">="),
    ("<=", "<="),
    (">=", ">="),
    ("≤", "<="),
    ("≥", ">="),
    ("=", "="),
    ("<", "<"),
    (">", ">"),
];

/// Byte offsets where `sep` occurs outside any bracket or brace.
fn top_level(s: &str, sep: &str) -> Vec<usize> {
    let mut depth = 0i32;
    let mut hits = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < s.len() {
        match bytes[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ => {}
        }
        if depth == 0 && s.is_char_boundary(i) && s[i..].starts_with(sep) {
            // A command separator (`\le`) must not be the start of a longer name (`\left`).
            let end = i + sep.len();
            let cut =
                sep.starts_with('\\') && s[end..].starts_with(|c: char| c.is_ascii_alphabetic());
            if !cut {
                hits.push(i);
                i = end;
                continue;
            }
        }
        i += 1;
    }
    hits
}

fn split_top<'a>(s: &'a str, sep: &str) -> Vec<&'a str> {
    let mut parts = Vec::new();
    let mut start = 0;
    for at in top_level(s, sep) {
        parts.push(&s[start..at]);
        start = at + sep.len();
    }
    parts.push(&s[start..]);
    parts
}

/// The offset of the bracket closing the one at byte 0, counting `(`/`[` against `)`/`]`.
fn closing(s: &str) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn text(s: &str) -> Answer {
    Answer::Text(
        s.chars()
            .filter(|c| !c.is_whitespace() && *c != '{' && *c != '}' && *c != '\\')
            .flat_map(char::to_lowercase)
            .collect(),
    )
}

/// Function names that may appear without a backslash and are not prose.
const FUNCTION_WORDS: [&str; 16] = [
    "sin", "cos", "tan", "cot", "sec", "csc", "log", "exp", "sqrt", "arcsin", "arccos", "arctan",
    "sinh", "cosh", "tanh", "infty",
];

/// Whether `s` holds prose: a word of three or more letters that is not a LaTeX command.
pub fn is_prose(s: &str) -> bool {
    let mut prev = ' ';
    let mut run = 0;
    let mut escaped = false;
    let mut word = String::new();
    for c in s.chars().chain([' ']) {
        if c.is_alphabetic() {
            if run == 0 {
                escaped = prev == '\\';
            }
            run += 1;
            word.push(c);
        } else {
            if run >= 3 && !escaped && !FUNCTION_WORDS.contains(&word.as_str()) {
                return true;
            }
            run = 0;
            word.clear();
        }
        prev = c;
    }
    false
}

/// The environments that write a matrix (what `\\begin{aligned}` or `\\begin{cases}` do not).
const MATRIX_ENVIRONMENTS: [&str; 8] = [
    "matrix",
    "pmatrix",
    "bmatrix",
    "Bmatrix",
    "vmatrix",
    "Vmatrix",
    "smallmatrix",
    "array",
];

/// Whether `s` writes a matrix (`\\begin{pmatrix}`, an `array`, …): its environment's name and an
/// array's column spec read as words, but it is not prose to be judged by its last number.
pub fn writes_a_matrix(s: &str) -> bool {
    s.match_indices("\\begin").any(|(at, b)| {
        let rest = s[at + b.len()..].trim_start();
        let name = rest.strip_prefix('{').and_then(|r| r.split_once('}'));
        name.is_some_and(|(name, _)| MATRIX_ENVIRONMENTS.contains(&name.trim()))
    })
}

/// Whether `s` reads as words (`Evelyn`, `even`, `ellipse`) rather than a product of letters.
fn is_words(s: &str) -> bool {
    s.chars().all(|c| c.is_alphabetic() || c == ' ')
        && s.split(' ').any(|w| w.chars().count() >= 3)
        && !s
            .split(' ')
            .any(|w| ["sin", "cos", "tan", "cot", "sec", "csc", "ln", "log", "exp"].contains(&w))
}

/// Most `\pm` signs one value may hold: each doubles the values it stands for, and the parses.
const MAX_PM: usize = 8;

/// Parses a cleaned answer (see `latex::clean`).
pub fn parse(s: &str) -> Answer {
    parse_nested(s, 0)
}

/// `parse` of a part nested `depth` levels deep in the answer; past `MAX_DEPTH` the part is
/// text, like any other the verifier cannot read.
fn parse_nested(s: &str, depth: usize) -> Answer {
    let s = s.trim();
    if depth > MAX_DEPTH {
        return text(s);
    }
    let nested = |part: &str| parse_nested(part, depth + 1);
    if let Some(m) = matrix(s, depth) {
        return m;
    }
    // `x \in [-2, 7]` is the interval.
    let mut cs = s.chars();
    if let (Some(v), Some(rest)) = (cs.next(), s.get(1..)) {
        if v.is_ascii_alphabetic() {
            if let Some(r) = rest.trim_start().strip_prefix("\\in") {
                if !r.starts_with(|c: char| c.is_ascii_alphabetic()) {
                    return nested(r);
                }
            }
        }
    }
    let unions = split_top(s, "\\cup");
    if unions.len() > 1 {
        return Answer::Union(unions.into_iter().map(nested).collect());
    }
    if let Some(inner) = s.strip_prefix("\\{").and_then(|r| r.strip_suffix("\\}")) {
        return set_of(split_top(inner, ","), depth);
    }
    if is_prose(s) {
        return text(s);
    }
    let mut items = split_top(s, ";");
    if items.len() == 1 {
        items = split_top(s, ",");
    }
    if items.len() > 1 {
        return set_of(items, depth);
    }
    if let (Some(open @ ('(' | '[')), Some(close @ (')' | ']'))) =
        (s.chars().next(), s.chars().last())
    {
        let inner = &s[1..s.len() - 1];
        if closing(s) == Some(s.len() - 1) && !top_level(inner, ",").is_empty() {
            let items = split_top(inner, ",").into_iter().map(nested).collect();
            return Answer::Seq { open, close, items };
        }
    }
    // `a \pm b` after the list splits, so that `\{1 \pm \sqrt5, -2\}` has three elements.
    if let Some(at) = s.find("\\pm").or_else(|| s.find('±')) {
        if s.matches("\\pm").count() + s.matches('±').count() > MAX_PM {
            return text(s);
        }
        let len = if s[at..].starts_with('±') {
            '±'.len_utf8()
        } else {
            3
        };
        let (head, tail) = (&s[..at], &s[at + len..]);
        let mut items = Vec::new();
        for sign in ["+", "-"] {
            match nested(&format!("{head}{sign}{tail}")) {
                Answer::Set(inner) => items.extend(inner),
                one => items.push(one),
            }
        }
        return Answer::Set(items);
    }
    for (spelling, op) in RELATIONS {
        if let Some(&at) = top_level(s, spelling).first() {
            let (lhs, rhs) = (&s[..at], &s[at + spelling.len()..]);
            if !lhs.trim().is_empty() && !rhs.trim().is_empty() {
                return Answer::Rel {
                    lhs: Box::new(nested(lhs)),
                    op,
                    rhs: Box::new(nested(rhs)),
                };
            }
        }
    }
    if is_words(s) {
        return text(s);
    }
    match expr::parse(s) {
        Some(e) => Answer::Expr(e),
        None => text(s),
    }
}

/// A set of the parsed parts of an answer nested `depth` deep; the two values of an `a \pm b`
/// part become two elements.
fn set_of(parts: Vec<&str>, depth: usize) -> Answer {
    let mut items = Vec::new();
    for p in parts {
        match parse_nested(p, depth + 1) {
            Answer::Set(pm) if p.contains("\\pm") || p.contains('±') => items.extend(pm),
            one => items.push(one),
        }
    }
    Answer::Set(items)
}

/// `\begin{pmatrix} a & b \\ c & d \end{pmatrix}` (also bmatrix, array with a column spec),
/// nested `depth` deep in the answer.
fn matrix(s: &str, depth: usize) -> Option<Answer> {
    // `\left[\begin{array}..\end{array}\right]`: the brackets drawn around an array.
    let inner = s.get(1..s.len().saturating_sub(1)).map(str::trim);
    if let (Some(inner), true) = (inner, s.starts_with(['[', '(']) && s.ends_with([']', ')'])) {
        if inner.starts_with("\\begin{") {
            return matrix(inner, depth);
        }
    }
    let rest = s.strip_prefix("\\begin{")?;
    let env_end = rest.find('}')?;
    let env = &rest[..env_end];
    let mut body = &rest[env_end + 1..];
    let end = format!("\\end{{{env}}}");
    body = body.strip_suffix(end.as_str())?;
    if env == "array" {
        let spec_end = super::latex::group_end(body.trim_start(), 0)?;
        body = &body.trim_start()[spec_end + 1..];
    }
    let rows: Vec<Vec<Answer>> = split_top(body, "\\\\")
        .into_iter()
        .filter(|r| !r.trim().is_empty())
        .map(|r| {
            split_top(r, "&")
                .into_iter()
                .map(|cell| parse_nested(cell, depth + 1))
                .collect()
        })
        .collect();
    Some(Answer::Matrix(rows))
}

/// Whether two answers are equivalent (symmetric).
pub fn equiv(a: &Answer, b: &Answer) -> bool {
    use Answer::*;
    match (a, b) {
        (Expr(x), Expr(y)) => expr_eq(x, y),
        (
            Rel {
                lhs: l1,
                op: o1,
                rhs: r1,
            },
            Rel {
                lhs: l2,
                op: o2,
                rhs: r2,
            },
        ) => {
            let same = o1 == o2 && equiv(l1, l2) && equiv(r1, r2);
            let flipped = flip(o1) == *o2 && equiv(l1, r2) && equiv(r1, l2);
            same || flipped || (o1 == o2 && difference_eq(l1, r1, l2, r2, *o1 == "="))
        }
        // `x = 5` against `5`: an assignment answers with its right-hand side.
        (Rel { lhs, op: "=", rhs }, other) | (other, Rel { lhs, op: "=", rhs })
            if is_symbol(lhs) =>
        {
            equiv(rhs, other)
        }
        (
            Seq {
                open: o1,
                close: c1,
                items: i1,
            },
            Seq {
                open: o2,
                close: c2,
                items: i2,
            },
        ) => {
            o1 == o2
                && c1 == c2
                && i1.len() == i2.len()
                && i1.iter().zip(i2).all(|(x, y)| equiv(x, y))
        }
        (Set(x), Set(y)) | (Union(x), Union(y)) => same_elements(x, y),
        (Set(x), other) | (other, Set(x)) if x.len() == 1 => equiv(&x[0], other),
        (Matrix(x), Matrix(y)) => {
            x.len() == y.len()
                && x.iter().zip(y).all(|(r1, r2)| {
                    r1.len() == r2.len() && r1.iter().zip(r2).all(|(p, q)| equiv(p, q))
                })
        }
        (Text(x), Text(y)) => x == y,
        _ => false,
    }
}

fn flip(op: &str) -> &str {
    match op {
        "<" => ">",
        ">" => "<",
        "<=" => ">=",
        ">=" => "<=",
        o => o,
    }
}

fn is_symbol(a: &Answer) -> bool {
    matches!(a, Answer::Expr(Expr::Var(_)))
}

/// `5x + 4 = 0` against `-5x - 4 = 0` or `5x = -4`: compare lhs − rhs (either sign for `=`).
fn difference_eq(l1: &Answer, r1: &Answer, l2: &Answer, r2: &Answer, either_sign: bool) -> bool {
    let (Answer::Expr(l1), Answer::Expr(r1), Answer::Expr(l2), Answer::Expr(r2)) = (l1, r1, l2, r2)
    else {
        return false;
    };
    // Without variables an equation is a statement: `\cos \pi = -1` is not `\cos 3\pi = -1`.
    let mut names = BTreeSet::new();
    for e in [l1, r1, l2, r2] {
        e.vars(&mut names);
    }
    if names.is_empty() {
        return false;
    }
    let d1 = Expr::Sub(Box::new(l1.clone()), Box::new(r1.clone()));
    let d2 = Expr::Sub(Box::new(l2.clone()), Box::new(r2.clone()));
    expr_eq(&d1, &d2) || (either_sign && expr_eq(&d1, &Expr::Neg(Box::new(d2))))
}

/// Every element of `x` pairs with a distinct equivalent element of `y`.
fn same_elements(x: &[Answer], y: &[Answer]) -> bool {
    if x.len() != y.len() {
        return false;
    }
    let mut used = vec![false; y.len()];
    x.iter().all(
        |a| match (0..y.len()).find(|&j| !used[j] && equiv(a, &y[j])) {
            Some(j) => {
                used[j] = true;
                true
            }
            None => false,
        },
    )
}

/// Evaluation points per comparison of expressions with variables.
const POINTS: u64 = 6;

/// Numeric equality; with variables, equality at `POINTS` random points (points where either
/// side is undefined are skipped, and at least two must remain).
fn expr_eq(x: &Expr, y: &Expr) -> bool {
    let mut names = BTreeSet::new();
    x.vars(&mut names);
    y.vars(&mut names);
    let scales: &[f64] = if x.has_percent() || y.has_percent() {
        &[0.01, 1.0]
    } else {
        &[1.0]
    };
    scales.iter().any(|&pct| {
        if names.is_empty() {
            let (a, b) = (x.eval(&HashMap::new(), pct), y.eval(&HashMap::new(), pct));
            // Values past f64's range all become ∞: equal when both sides name infinity, else
            // only when they are the same expression (10^{400} is not 10^{401}).
            if !a.is_finite() && !(x.has_infinity() && y.has_infinity()) {
                return x == y;
            }
            return !a.re.is_nan() && !a.im.is_nan() && close(a, b);
        }
        let mut valid = 0;
        for p in 0..POINTS {
            // Values in [0.1, 2.1): away from 0, where distinct expressions often agree, and
            // small enough that terms like e^{-50t} still count.
            let vars: HashMap<String, C> = names
                .iter()
                .enumerate()
                .map(|(k, n)| {
                    (
                        n.clone(),
                        C::real(0.1 + 2.0 * crate::rng::uniform(7, k as u64, p)),
                    )
                })
                .collect();
            let (a, b) = (x.eval(&vars, pct), y.eval(&vars, pct));
            if !a.is_finite() || !b.is_finite() {
                continue;
            }
            if !close(a, b) {
                return false;
            }
            valid += 1;
        }
        valid >= 2
    })
}
