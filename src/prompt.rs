//! Prompt formatting (METHOD.md §1): the paper's plain template with `{budget}` and `{question}`,
//! a user template file, or the model's own chat template rendered with minijinja.

use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use minijinja::{Environment, Error, ErrorKind};
use std::path::Path;

/// The paper's R1-style prompt (plain text, no chat template).
pub const PAPER_TEMPLATE: &str = "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning process and answer are enclosed within <think></think> and <answer></answer> tags, respectively, i.e., <think>reasoning process here</think> <answer>answer here</answer>. IMPORTANT: You should use exactly {budget} tokens in your response. User: {question} Assistant:";

/// The user message in chat mode: the paper's instructions, with the role wrapper left to the
/// model's chat template.
pub const CHAT_USER_TEMPLATE: &str = "{question}\nThink about the reasoning process first, then give the answer. Enclose the reasoning and the answer within <think></think> and <answer></answer> tags, respectively, i.e., <think>reasoning process here</think> <answer>answer here</answer>. IMPORTANT: You should use exactly {budget} tokens in your response.";

#[derive(Debug, Clone, PartialEq)]
pub enum PromptTemplate {
    /// Text with `{question}` and optionally `{budget}`, substituted literally.
    Plain(String),
    /// The model's chat template around one user message built from `user_template`.
    Chat { user_template: String },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl PromptTemplate {
    pub fn paper() -> Self {
        PromptTemplate::Plain(PAPER_TEMPLATE.to_string())
    }

    pub fn default_chat() -> Self {
        PromptTemplate::Chat {
            user_template: CHAT_USER_TEMPLATE.to_string(),
        }
    }

    /// A plain template from a file; it must contain `{question}`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read prompt template {}", path.display()))?;
        if !text.contains("{question}") {
            bail!(
                "prompt template {} has no {{question}} placeholder",
                path.display()
            );
        }
        Ok(PromptTemplate::Plain(text))
    }

    /// The prompt text for one question under `budget`.
    pub fn render(&self, question: &str, budget: Option<usize>, tok: &Tokenizer) -> Result<String> {
        match self {
            PromptTemplate::Plain(t) => substitute(t, question, budget),
            PromptTemplate::Chat { user_template } => {
                let template = tok.chat_template().context(
                    "the model has no chat template (no `chat_template` in tokenizer_config.json and no chat_template.jinja); use a plain template",
                )?;
                let content = substitute(user_template, question, budget)?;
                let messages = [ChatMessage {
                    role: "user".into(),
                    content,
                }];
                render_chat(template, &messages, true, tok.bos_token(), tok.eos_token())
            }
        }
    }
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
    // Substituting the question last keeps braces inside it from being read as placeholders.
    Ok(text.replace("{question}", question))
}

/// Renders an HF chat template the way `apply_chat_template` does (trim_blocks, lstrip_blocks,
/// Python string methods, `raise_exception`, `strftime_now`).
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| -> Result<String, Error> {
        Ok(strftime_now(&fmt))
    });
    env.add_template("chat", template)
        .context("the chat template does not parse")?;
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    };
    env.get_template("chat")?
        .render(ctx)
        .context("cannot render the chat template")
}

/// Today's date (UTC) for templates that print it; supports %d %m %Y %b %B.
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
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS[(month - 1) as usize];
    fmt.replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%B", name)
        .replace("%b", &name[..3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_template_substitutes_budget_and_question_literally() {
        let got = substitute(PAPER_TEMPLATE, "What is {x} + 1?", Some(87)).unwrap();
        assert!(got.ends_with("IMPORTANT: You should use exactly 87 tokens in your response. User: What is {x} + 1? Assistant:"));
        assert!(got.starts_with("A conversation between User and Assistant."));
        let err = substitute(PAPER_TEMPLATE, "q", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("{budget}"), "{err}");
        assert_eq!(substitute("Q: {question}", "2+2", None).unwrap(), "Q: 2+2");
    }

    #[test]
    fn template_file_needs_a_question_placeholder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        std::fs::write(&path, "Solve in {budget} tokens.").unwrap();
        let err = PromptTemplate::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("t.txt") && err.contains("{question}"), "{err}");
        let err = PromptTemplate::from_file(&dir.path().join("absent.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent.txt"), "{err}");
    }

    #[test]
    fn qwen25_instruct_template_renders_like_transformers() {
        // The Qwen2.5-Instruct template, tools branch included.
        let template = r#"{%- if tools %}
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
        let messages = [ChatMessage {
            role: "user".into(),
            content: "What is 2+3?".into(),
        }];
        let got = render_chat(template, &messages, true, None, Some("<|im_end|>")).unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let template = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user'] %}{{ raise_exception('only user messages') }}{% endif %}[{{ m.content.strip() }}]{% endfor %}";
        let user = [ChatMessage {
            role: "user".into(),
            content: "  hi  ".into(),
        }];
        assert_eq!(
            render_chat(template, &user, false, Some("<s>"), None).unwrap(),
            "<s>[hi]"
        );
        let bad = [ChatMessage {
            role: "system".into(),
            content: "x".into(),
        }];
        let err = format!(
            "{:#}",
            render_chat(template, &bad, false, None, None).unwrap_err()
        );
        assert!(err.contains("only user messages"), "{err}");
    }

    #[test]
    fn strftime_now_formats_a_plausible_date() {
        let s = strftime_now("%d %b %Y");
        let parts: Vec<&str> = s.split(' ').collect();
        assert_eq!(parts.len(), 3, "{s}");
        assert!(parts[2].parse::<i32>().unwrap() >= 2025, "{s}");
    }
}
