//! Prompt formatting (METHOD.md §1): the paper's plain template with `{budget}` and `{question}`,
//! a template file, or the model's own chat template rendered with minijinja the way
//! transformers' `apply_chat_template` renders it.

use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// The paper's R1-style prompt (plain text, no chat template).
pub const PAPER_TEMPLATE: &str = "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning process and answer are enclosed within <think></think> and <answer></answer> tags, respectively, i.e., <think>reasoning process here</think> <answer>answer here</answer>. IMPORTANT: You should use exactly {budget} tokens in your response. User: {question} Assistant:";

/// The user message in chat mode: the question, then the paper's instructions word for word; the
/// "A conversation between User and Assistant" framing and the `User:`/`Assistant:` turns are
/// left to the model's chat template. The instructions come last so the budget is the final
/// thing the model reads before answering.
pub const CHAT_USER_TEMPLATE: &str = "{question}\n\nThe assistant first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning process and answer are enclosed within <think></think> and <answer></answer> tags, respectively, i.e., <think>reasoning process here</think> <answer>answer here</answer>. IMPORTANT: You should use exactly {budget} tokens in your response.";

/// How a question (and the current budget) becomes prompt text. Templates hold `{question}` and
/// optionally `{budget}`, both substituted literally (no other brace is special).
#[derive(Debug, Clone, PartialEq)]
pub enum PromptTemplate {
    /// The whole prompt, as plain text.
    Plain(String),
    /// The model's chat template around one user message built from `user_template`.
    Chat { user_template: String },
}

/// One message handed to a chat template.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl PromptTemplate {
    /// The paper's prompt (METHOD.md §1).
    pub fn paper() -> Self {
        PromptTemplate::Plain(PAPER_TEMPLATE.to_string())
    }

    /// Chat mode with [`CHAT_USER_TEMPLATE`].
    pub fn default_chat() -> Self {
        PromptTemplate::Chat {
            user_template: CHAT_USER_TEMPLATE.to_string(),
        }
    }

    /// A plain template; it must contain `{question}`.
    pub fn plain(text: impl Into<String>) -> Result<Self> {
        let text = text.into();
        check_has_question(&text, "the prompt template")?;
        Ok(PromptTemplate::Plain(text))
    }

    /// Chat mode with a user-message template; it must contain `{question}`.
    pub fn chat(user_template: impl Into<String>) -> Result<Self> {
        let user_template = user_template.into();
        check_has_question(&user_template, "the chat user template")?;
        Ok(PromptTemplate::Chat { user_template })
    }

    /// A plain template from a file. One trailing newline (which editors add) is dropped, as
    /// Jinja drops it; end the file with two newlines to keep one.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            let unknown = if path.exists() {
                ""
            } else {
                " (no such file, nor a template by name: paper, chat; raw in generate and eval)"
            };
            format!("cannot read prompt template {}{unknown}", path.display())
        })?;
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(&text);
        check_has_question(text, &format!("prompt template {}", path.display()))?;
        Ok(PromptTemplate::Plain(text.to_string()))
    }

    /// The prompt text for one question under `budget`.
    pub fn render(&self, question: &str, budget: Option<usize>, tok: &Tokenizer) -> Result<String> {
        match self {
            PromptTemplate::Plain(t) => substitute(t, question, budget),
            PromptTemplate::Chat { user_template } => {
                let Some(template) = tok.chat_template() else {
                    bail!(
                        "the model in {} has no chat template (no `chat_template` in \
                         tokenizer_config.json and no chat_template.jinja); use a plain prompt template",
                        tok.model_dir().display()
                    );
                };
                let messages = [ChatMessage {
                    role: "user".into(),
                    content: substitute(user_template, question, budget)?,
                }];
                render_chat(template, &messages, true, tok.bos_token(), tok.eos_token())
                    .with_context(|| {
                        format!(
                            "chat template of the model in {}",
                            tok.model_dir().display()
                        )
                    })
            }
        }
    }
}

fn check_has_question(template: &str, what: &str) -> Result<()> {
    if !template.contains("{question}") {
        bail!("{what} has no {{question}} placeholder");
    }
    Ok(())
}

/// Replaces `{budget}` and `{question}` literally; other braces are left alone.
fn substitute(template: &str, question: &str, budget: Option<usize>) -> Result<String> {
    let text = if template.contains("{budget}") {
        let b = budget
            .context("the prompt template has a {budget} placeholder but no budget was given")?;
        template.replace("{budget}", &b.to_string())
    } else {
        template.to_string()
    };
    // The question goes in last, so placeholders written inside it stay as they are.
    Ok(text.replace("{question}", question))
}

/// Instructions a chat template may run (minijinja's fuel): real templates take a few thousand
/// per conversation.
const CHAT_TEMPLATE_FUEL: u64 = 10_000_000;

/// Renders an HF chat template the way `apply_chat_template` does: Jinja with `trim_blocks` and
/// `lstrip_blocks`, Python string/dict methods, `raise_exception`, `strftime_now`, a
/// Python-compatible `tojson`, `tools`/`documents` set to none, and the special tokens defined
/// only when the tokenizer has them.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let mut env = Environment::new();
    // a template that loops without end (or nearly) stops with an error instead of hanging
    env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
    env.add_filter("tojson", tojson);
    env.add_template("chat", template)
        .context("the chat template does not parse")?;

    let mut ctx = BTreeMap::from([
        ("messages", Value::from_serialize(messages)),
        ("add_generation_prompt", Value::from(add_generation_prompt)),
        ("tools", Value::from(())),
        ("documents", Value::from(())),
    ]);
    for (name, token) in [("bos_token", bos_token), ("eos_token", eos_token)] {
        if let Some(t) = token {
            ctx.insert(name, Value::from(t));
        }
    }
    env.get_template("chat")?
        .render(ctx)
        .context("cannot render the chat template")
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=indent)`, so `", "`
/// and `": "` separators and no HTML escaping (minijinja's own filter is compact and escapes
/// `<`, `>`, `&`, `'`).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    depth: usize,
) -> Result<(), Error> {
    let (open, close, is_map) = match value.kind() {
        ValueKind::Undefined | ValueKind::None => {
            out.push_str("null");
            return Ok(());
        }
        ValueKind::Bool => {
            out.push_str(if value.is_true() { "true" } else { "false" });
            return Ok(());
        }
        ValueKind::Number => {
            out.push_str(&value.to_string());
            return Ok(());
        }
        ValueKind::String => {
            out.push_str(&json_string(value.as_str().unwrap_or_default()));
            return Ok(());
        }
        ValueKind::Seq | ValueKind::Iterable => ('[', ']', false),
        ValueKind::Map => ('{', '}', true),
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot serialize {value}"),
            ))
        }
    };
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let items: Vec<Value> = value.try_iter()?.collect();
    out.push(open);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            // Python drops the space after the comma when it indents.
            out.push_str(if indent.is_some() { "," } else { ", " });
        }
        newline(out, depth + 1);
        if is_map {
            let key = item
                .as_str()
                .map_or_else(|| item.to_string(), str::to_string);
            out.push_str(&json_string(&key));
            out.push_str(": ");
            write_json(out, &value.get_item(item)?, indent, depth + 1)?;
        } else {
            write_json(out, item, indent, depth + 1)?;
        }
    }
    if !items.is_empty() {
        newline(out, depth);
    }
    out.push(close);
    Ok(())
}

/// A JSON string literal; serde_json escapes exactly what Python's json.dumps escapes when
/// `ensure_ascii=False`.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Python's `datetime.now().strftime(fmt)` for the directives chat templates use
/// (`%d %-d %m %y %Y %b %B %a %A %H %M %S %%`), in UTC; other directives are kept as written.
fn strftime_now(fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let month_name = MONTHS[(month - 1) as usize];
    // 1970-01-01 was a Thursday.
    let day_name = DAYS[((days + 4) % 7) as usize];
    let (hour, minute, second) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);

    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut directive = chars.next();
        let unpadded = directive == Some('-');
        if unpadded {
            directive = chars.next();
        }
        let two = |v: i64| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:02}")
            }
        };
        match directive {
            Some('d') => out.push_str(&two(day)),
            Some('m') => out.push_str(&two(month)),
            Some('H') => out.push_str(&two(hour as i64)),
            Some('M') => out.push_str(&two(minute as i64)),
            Some('S') => out.push_str(&two(second as i64)),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('Y') => out.push_str(&year.to_string()),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(day_name),
            Some('a') => out.push_str(&day_name[..3]),
            Some('%') => out.push('%'),
            other => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.extend(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template that would loop for ever (here 10^10 iterations) stops with an error.
    #[test]
    fn a_runaway_chat_template_is_an_error_not_a_hang() {
        let looping =
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let err = render_chat(looping, &[], true, None, None).unwrap_err();
        assert!(format!("{err:#}").contains("fuel"), "{err:#}");
    }
    use crate::tokenizer::tests::model_dir;

    /// The Qwen2.5-Instruct chat template, tools branch included.
    const QWEN25_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    /// A Llama-3-style template: BOS, Python `.strip()`, `set` inside `if`, role checks through
    /// `raise_exception`, and today's date.
    const LLAMA3_STYLE_TEMPLATE: &str = r#"{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'].strip() %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = "" %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Today Date: ' + strftime_now('%d %b %Y') + '\n\n' }}
{{- system + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'].strip() + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    /// The template is METHOD.md §1's, character for character (the spec is read from
    /// ../shared, as the data is): one line, indented there as a code block.
    #[test]
    fn paper_template_is_the_methods_prompt() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/METHOD.md");
        let method = std::fs::read_to_string(path).unwrap();
        let start = "A conversation between User and Assistant.";
        let line = method.lines().map(str::trim).find(|l| l.starts_with(start));
        assert_eq!(line, Some(PAPER_TEMPLATE), "{path} §1");
        assert!(!PAPER_TEMPLATE.contains('\n'));
        assert!(PAPER_TEMPLATE.ends_with("User: {question} Assistant:"));
    }

    #[test]
    fn plain_template_substitutes_budget_and_question_literally() {
        let got = substitute(PAPER_TEMPLATE, "Is {x} < {budget}? {question}", Some(87)).unwrap();
        assert!(got.ends_with(
            "IMPORTANT: You should use exactly 87 tokens in your response. \
             User: Is {x} < {budget}? {question} Assistant:"
        ));
        assert_eq!(substitute("Q: {question}", "2+2", None).unwrap(), "Q: 2+2");
        let err = substitute(PAPER_TEMPLATE, "q", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("{budget}"), "{err}");
    }

    #[test]
    fn templates_need_a_question_placeholder() {
        assert!(PromptTemplate::plain("{question} in {budget}").is_ok());
        let err = PromptTemplate::plain("Solve it.").unwrap_err().to_string();
        assert!(err.contains("{question}"), "{err}");
        assert!(PromptTemplate::chat("no placeholder").is_err());
        assert!(PromptTemplate::chat("{question}").is_ok());
    }

    #[test]
    fn template_files_are_checked_and_lose_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        std::fs::write(&path, "Solve in {budget} tokens.\n").unwrap();
        let err = format!("{:#}", PromptTemplate::from_file(&path).unwrap_err());
        assert!(err.contains("t.txt") && err.contains("{question}"), "{err}");

        std::fs::write(&path, "Q: {question}\nA:\n").unwrap();
        let t = PromptTemplate::from_file(&path).unwrap();
        assert_eq!(t, PromptTemplate::Plain("Q: {question}\nA:".into()));
        std::fs::write(&path, "Q: {question}\r\n\r\n").unwrap();
        let t = PromptTemplate::from_file(&path).unwrap();
        assert_eq!(t, PromptTemplate::Plain("Q: {question}\r\n".into()));

        let err = format!(
            "{:#}",
            PromptTemplate::from_file(&dir.path().join("absent.txt")).unwrap_err()
        );
        assert!(
            err.contains("absent.txt") && err.contains("no such file, nor a template by name"),
            "{err}"
        );
        // a file that is there but cannot be read is not said to be missing
        let err = format!("{:#}", PromptTemplate::from_file(dir.path()).unwrap_err());
        assert!(!err.contains("no such file"), "{err}");
    }

    #[test]
    fn qwen25_instruct_template_renders_like_transformers() {
        let got = render_chat(
            QWEN25_TEMPLATE,
            &[msg("user", "What is 2+3?")],
            true,
            None,
            Some("<|im_end|>"),
        )
        .unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
        );
        let got = render_chat(
            QWEN25_TEMPLATE,
            &[msg("system", "Be brief."), msg("user", "Hi")],
            false,
            None,
            Some("<|im_end|>"),
        )
        .unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn llama3_style_template_with_bos_strip_and_date() {
        let messages = [
            msg("system", "  Be brief. "),
            msg("user", " What is 2+3? \n"),
        ];
        let got = render_chat(
            LLAMA3_STYLE_TEMPLATE,
            &messages,
            true,
            Some("<|begin_of_text|>"),
            Some("<|eot_id|>"),
        )
        .unwrap();
        let today = strftime_now("%d %b %Y");
        assert_eq!(
            got,
            format!(
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: {today}\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            )
        );

        let err = render_chat(
            LLAMA3_STYLE_TEMPLATE,
            &[msg("user", "a"), msg("user", "b")],
            true,
            None,
            None,
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("roles must alternate"),
            "{err:#}"
        );
    }

    #[test]
    fn tojson_and_variables_match_transformers() {
        let template = r#"{{ "a<b\"\né" | tojson }}|{{ [1, 2.5, "x", none, true] | tojson }}|{{ {"k": [1, {}]} | tojson(indent=2) }}|{% if tools is none and documents is none %}T{% endif %}|{% if bos_token is not defined %}U{% endif %}{{ eos_token }}"#;
        let got = render_chat(template, &[], false, None, Some("</s>")).unwrap();
        assert_eq!(
            got,
            "\"a<b\\\"\\né\"|[1, 2.5, \"x\", null, true]|{\n  \"k\": [\n    1,\n    {}\n  ]\n}|T|U</s>"
        );
    }

    #[test]
    fn bad_templates_give_errors() {
        let err = render_chat("{% if %}", &[], true, None, None).unwrap_err();
        assert!(format!("{err:#}").contains("does not parse"), "{err:#}");
        let err = render_chat("{{ 'x' | tojson(sort_keys=true) }}", &[], true, None, None);
        assert!(err.is_err());
    }

    #[test]
    fn render_through_a_model_folder() {
        let dir = model_dir(&[("chat_template.jinja", QWEN25_TEMPLATE)]);
        let tok = Tokenizer::from_model_dir(dir.path()).unwrap();
        let paper = PromptTemplate::paper()
            .render("1+1?", Some(50), &tok)
            .unwrap();
        assert_eq!(
            paper,
            PAPER_TEMPLATE
                .replace("{budget}", "50")
                .replace("{question}", "1+1?")
        );

        let chat = PromptTemplate::default_chat()
            .render("1+1?", Some(50), &tok)
            .unwrap();
        let user = CHAT_USER_TEMPLATE
            .replace("{budget}", "50")
            .replace("{question}", "1+1?");
        assert!(user.starts_with("1+1?\n\nThe assistant first thinks"));
        assert!(user.ends_with("exactly 50 tokens in your response."));
        assert!(chat.ends_with(&format!(
            "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        )));

        let bare = model_dir(&[]);
        let tok = Tokenizer::from_model_dir(bare.path()).unwrap();
        let err = PromptTemplate::default_chat()
            .render("q", Some(5), &tok)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&bare.path().display().to_string()) && err.contains("no chat template"),
            "{err}"
        );
    }

    #[test]
    fn strftime_now_formats_like_python() {
        let s = strftime_now("%Y-%m-%d|%A|%a|%B|%-d|%%|%q");
        let parts: Vec<&str> = s.split('|').collect();
        assert_eq!(parts.len(), 7, "{s}");
        let ymd: Vec<&str> = parts[0].split('-').collect();
        assert!(ymd[0].parse::<i32>().unwrap() >= 2025, "{s}");
        assert!(ymd[1].len() == 2 && ymd[2].len() == 2, "{s}");
        assert!(
            parts[1].ends_with("day") && parts[1].starts_with(parts[2]),
            "{s}"
        );
        assert_eq!(parts[4], ymd[2].trim_start_matches('0'), "{s}");
        assert_eq!(&parts[5..], ["%", "%q"], "{s}");
    }
}
