//! Finding the answer in a model's response: the first well-formed `<answer>…</answer>` span,
//! else the last `\boxed{}`, else the last number.

use super::latex::group_end;

/// The text inside the first well-formed `<tag>…</tag>` span, or None: the first `</tag>` that
/// closes an open tag, and the last `<tag>` before it, so the text holds neither tag. Stray
/// tags around it neither help nor hurt (`</answer> <answer>7</answer>` and
/// `<answer>1 <answer>7</answer>` both hold `7`), nor do spans after it; the content may be
/// empty. Tags are matched exactly (case-sensitive, no attributes or spaces inside the
/// brackets). The reward's correctness and format terms both read answers through this
/// (METHOD.md §3), so they agree on what the answer is.
pub fn tag_span<'a>(text: &'a str, tag: &str) -> Option<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let first_open = text.find(&open)?;
    let end = first_open + text[first_open..].find(&close)?;
    let start = text[..end].rfind(&open)? + open.len();
    Some(&text[start..end])
}

/// Content of the first well-formed `<answer>…</answer>` span ([`tag_span`]). A `\boxed{}`
/// inside it is unwrapped, since models often write `<answer>\boxed{5}</answer>`.
pub fn answer_tag(response: &str) -> Option<String> {
    let inner = tag_span(response, "answer")?;
    Some(last_boxed(inner).unwrap_or_else(|| inner.trim().to_string()))
}

/// Content of the last `\boxed{...}` or `\fbox{...}`; `\boxed 5` (no braces) takes one word.
pub fn last_boxed(text: &str) -> Option<String> {
    let at = ["\\boxed", "\\fbox"]
        .iter()
        .filter_map(|c| text.rfind(c).map(|i| (i, c.len())))
        .max()?;
    let rest = &text[at.0 + at.1..];
    if let Some(r) = rest.strip_prefix(' ') {
        let word: String = r
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '$')
            .collect();
        return (!word.is_empty()).then_some(word);
    }
    if !rest.starts_with('{') {
        return None;
    }
    let end = group_end(rest, 0)?;
    Some(rest[1..end].trim().to_string())
}

/// The last number in the text: optional sign, digits with thousands commas, decimals, and a
/// `/denominator` (`-1,234.5`, `3/4`, `.5`).
pub fn last_number(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut found = None;
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i].is_ascii_digit()
            || (chars[i] == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit));
        if !starts {
            i += 1;
            continue;
        }
        let mut start = i;
        if i > 0 && chars[i - 1] == '-' {
            start = i - 1;
        }
        let mut j = i;
        while j < chars.len() {
            let c = chars[j];
            let next_digit = chars.get(j + 1).is_some_and(char::is_ascii_digit);
            if c.is_ascii_digit() || ((c == ',' || c == '.' || c == '/') && next_digit) {
                j += 1;
            } else {
                break;
            }
        }
        found = Some(chars[start..j].iter().collect::<String>());
        i = j;
    }
    found
}
