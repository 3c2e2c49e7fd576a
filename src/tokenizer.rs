//! The model's tokenizer (`tokenizer.json`) and its special tokens.
//!
//! EOS ids are gathered from every place HF keeps them: `generation_config.json`, `config.json`
//! and the `eos_token` of `tokenizer_config.json`. Generation stops at any of them.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_ids: Vec<u32>,
    pad_id: Option<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and the special tokens of a model folder.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            bail!("missing tokenizer file {}", path.display());
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("invalid tokenizer file {}", path.display()))?;

        let tok_config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let gen_config = read_json_opt(&dir.join("generation_config.json"))?;
        let model_config = read_json_opt(&dir.join("config.json"))?;
        let special = |key: &str| -> Result<Option<String>> {
            let Some(cfg) = &tok_config else {
                return Ok(None);
            };
            token_string(cfg.get(key)).with_context(|| {
                format!(
                    "{}: key `{key}`",
                    dir.join("tokenizer_config.json").display()
                )
            })
        };
        let bos_token = special("bos_token")?;
        let eos_token = special("eos_token")?;
        let pad_token = special("pad_token")?;

        // EOS: generation_config.json, else config.json; plus the tokenizer's eos_token.
        let mut eos_ids = match (&gen_config, &model_config) {
            (Some(g), _) if g.get("eos_token_id").is_some_and(|v| !v.is_null()) => {
                ids_of(g, "eos_token_id")
                    .with_context(|| format!("{}", dir.join("generation_config.json").display()))?
            }
            (_, Some(c)) => ids_of(c, "eos_token_id")
                .with_context(|| format!("{}", dir.join("config.json").display()))?,
            _ => Vec::new(),
        };
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos_ids.push(id);
        }
        let mut seen = Vec::new();
        eos_ids.retain(|id| {
            if seen.contains(id) {
                false
            } else {
                seen.push(*id);
                true
            }
        });

        let pad_id = match gen_config
            .as_ref()
            .map(|g| ids_of(g, "pad_token_id"))
            .transpose()?
        {
            Some(ids) if !ids.is_empty() => Some(ids[0]),
            _ => pad_token.as_deref().and_then(|t| inner.token_to_id(t)),
        };
        let chat_template = chat_template(dir, tok_config.as_ref())?;
        Ok(Tokenizer {
            inner,
            eos_ids,
            pad_id,
            bos_token,
            eos_token,
            chat_template,
        })
    }

    /// Token ids of `text`, without adding BOS/EOS (HF `add_special_tokens=False`); special-token
    /// strings inside the text still map to their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize text: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow::anyhow!("cannot decode token ids: {e}"))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_id
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The model's Jinja chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(Some(v))
}

/// A special token given as a string or as `{"content": "..."}`.
fn token_string(v: Option<&Value>) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => bail!("expected a string or an object with a string `content`"),
        },
        Some(other) => bail!("expected a string, got {other}"),
    }
}

/// An id field that may be an int, a list of ints, or absent.
fn ids_of(cfg: &Value, key: &str) -> Result<Vec<u32>> {
    let one = |v: &Value| -> Result<u32> {
        v.as_u64()
            .filter(|&i| i <= u32::MAX as u64)
            .map(|i| i as u32)
            .with_context(|| format!("key `{key}`: {v} is not a token id"))
    };
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// `chat_template` of tokenizer_config.json (a string, or a list of named templates of which
/// "default" is taken), else the file `chat_template.jinja`.
fn chat_template(dir: &Path, tok_config: Option<&Value>) -> Result<Option<String>> {
    let at = || {
        format!(
            "{}: key `chat_template`",
            dir.join("tokenizer_config.json").display()
        )
    };
    match tok_config.and_then(|c| c.get("chat_template")) {
        Some(Value::String(s)) => return Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let default = list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
            let template = default
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str);
            return template
                .map(|t| Some(t.to_string()))
                .with_context(|| format!("{}: no template named \"default\"", at()));
        }
        None | Some(Value::Null) => {}
        Some(other) => bail!("{}: expected a string or a list, got {other}", at()),
    }
    let file = dir.join("chat_template.jinja");
    if file.is_file() {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        return Ok(Some(text));
    }
    Ok(None)
}
