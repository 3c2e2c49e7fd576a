//! A small parser and evaluator for LaTeX-flavoured math expressions: numbers, variables,
//! `+ - * / ^`, implicit multiplication (`2x`, `3\sqrt{5}`, `2(k+1)`), `\frac`, `\sqrt[n]{}`,
//! trig and log functions, `!`, `%` and `|x|`. Two expressions are compared by evaluating them,
//! not by rewriting them, so equivalence is numeric at a few points (see `answer.rs`).

use super::numeric::{factorial, C};
use super::MAX_DEPTH;
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Letter(char),
    /// A function name written without a backslash (`sin x`, `log(2)`).
    Word(&'static str),
    Cmd(String),
    Sym(char),
}

/// Function names recognised with or without a backslash, longest first so `arcsin` wins over `sin`.
const FUNCS: [&str; 17] = [
    "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "sqrt", "sin", "cos", "tan", "cot",
    "sec", "csc", "exp", "log", "ln", "lg",
];

/// Commands that name a symbol (a variable) rather than an operation.
const GREEK: [&str; 20] = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "varepsilon",
    "zeta",
    "eta",
    "theta",
    "vartheta",
    "lambda",
    "mu",
    "nu",
    "xi",
    "rho",
    "sigma",
    "tau",
    "phi",
    "varphi",
    "omega",
];

fn lex(s: &str) -> Option<Vec<Tok>> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            // Scientific notation only when digits follow the e: `2e^{x}` is 2·e^x.
            if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
                let mut j = i + 1;
                if j < chars.len() && (chars[j] == '-' || chars[j] == '+') {
                    j += 1;
                }
                if j < chars.len() && chars[j].is_ascii_digit() {
                    while j < chars.len() && chars[j].is_ascii_digit() {
                        j += 1;
                    }
                    i = j;
                }
            }
            let text: String = chars[start..i].iter().collect();
            out.push(Tok::Num(text.parse().ok()?));
        } else if c == '\\' {
            let start = i + 1;
            i = start;
            while i < chars.len() && chars[i].is_ascii_alphabetic() {
                i += 1;
            }
            if i == start {
                // `\{`, `\}`, `\|`: escaped symbols.
                out.push(Tok::Sym(*chars.get(start)?));
                i += 1;
            } else {
                out.push(Tok::Cmd(chars[start..i].iter().collect()));
            }
        } else if c.is_ascii_alphabetic() {
            let rest: String = chars[i..].iter().take(6).collect();
            match FUNCS.iter().find(|f| rest.starts_with(*f)) {
                Some(f) => {
                    out.push(Tok::Word(f));
                    i += f.len();
                }
                None => {
                    out.push(Tok::Letter(c));
                    i += 1;
                }
            }
        } else {
            out.push(match c {
                'π' => Tok::Cmd("pi".into()),
                '∞' => Tok::Cmd("infty".into()),
                '√' => Tok::Cmd("sqrt".into()),
                '×' | '·' | '⋅' => Tok::Sym('*'),
                '÷' => Tok::Sym('/'),
                '−' | '–' => Tok::Sym('-'),
                _ => Tok::Sym(c),
            });
            i += 1;
        }
    }
    Some(out)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Func {
    Sin,
    Cos,
    Tan,
    Cot,
    Sec,
    Csc,
    Sinh,
    Cosh,
    Tanh,
    Asin,
    Acos,
    Atan,
    Ln,
    Log10,
    Exp,
    Sqrt,
    Abs,
}

fn func_named(name: &str) -> Option<Func> {
    Some(match name {
        "sin" => Func::Sin,
        "cos" => Func::Cos,
        "tan" => Func::Tan,
        "cot" => Func::Cot,
        "sec" => Func::Sec,
        "csc" => Func::Csc,
        "sinh" => Func::Sinh,
        "cosh" => Func::Cosh,
        "tanh" => Func::Tanh,
        "arcsin" => Func::Asin,
        "arccos" => Func::Acos,
        "arctan" => Func::Atan,
        "ln" => Func::Ln,
        "log" | "lg" => Func::Log10,
        "exp" => Func::Exp,
        "sqrt" => Func::Sqrt,
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Num(f64),
    Const(C),
    Var(String),
    Neg(Box<Expr>),
    Add(Box<Expr>, Box<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    Pow(Box<Expr>, Box<Expr>),
    Call(Func, Box<Expr>),
    Fact(Box<Expr>),
    /// `x%`: read as x/100 or as x (see `eval`), as math-verify accepts both.
    Percent(Box<Expr>),
}

fn b(e: Expr) -> Box<Expr> {
    Box::new(e)
}

/// Parses a whole expression; `None` when any of it is not understood, or when it nests deeper
/// than `MAX_DEPTH` (in the text or as a tree).
pub fn parse(s: &str) -> Option<Expr> {
    let toks = lex(s)?;
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
    };
    let e = p.sum()?;
    (p.pos == p.toks.len() && e.depth() <= MAX_DEPTH).then_some(e)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    /// The atoms, signs and exponents the parser is in: every cycle of its recursion passes one.
    depth: usize,
}

/// The depth of the left-deep tree (`1+2+3`, `2xy`, `5!!`) that a parser loop builds without
/// recursing; `eval` and the rest recurse through it, so it is bounded as it grows.
#[derive(Default)]
struct Chain(Option<usize>);

impl Chain {
    /// `op(e, rhs)`, or `None` past `MAX_DEPTH`.
    fn link(&mut self, op: fn(Box<Expr>, Box<Expr>) -> Expr, e: Expr, rhs: Expr) -> Option<Expr> {
        self.grow(&e, rhs.depth())?;
        Some(op(b(e), b(rhs)))
    }

    /// `op(e)`, or `None` past `MAX_DEPTH`.
    fn wrap(&mut self, op: fn(Box<Expr>) -> Expr, e: Expr) -> Option<Expr> {
        self.grow(&e, 0)?;
        Some(op(b(e)))
    }

    /// The first link measures the chain's first operand, later ones only their new operand.
    fn grow(&mut self, e: &Expr, rhs: usize) -> Option<()> {
        let depth = 1 + self.0.unwrap_or_else(|| e.depth()).max(rhs);
        self.0 = Some(depth);
        (depth <= MAX_DEPTH).then_some(())
    }
}

impl Parser {
    /// Runs `f` one nesting level deeper; past `MAX_DEPTH` it fails, and so the whole parse.
    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Option<T>) -> Option<T> {
        if self.depth > MAX_DEPTH {
            return None;
        }
        self.depth += 1;
        let r = f(self);
        self.depth -= 1;
        r
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Sym(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn eat_cmd(&mut self, names: &[&str]) -> bool {
        match self.peek() {
            Some(Tok::Cmd(n)) if names.contains(&n.as_str()) => {
                self.pos += 1;
                true
            }
            _ => false,
        }
    }

    fn sum(&mut self) -> Option<Expr> {
        let mut e = self.term()?;
        let mut chain = Chain::default();
        loop {
            if self.eat('+') {
                e = chain.link(Expr::Add, e, self.term()?)?;
            } else if self.eat('-') {
                e = chain.link(Expr::Sub, e, self.term()?)?;
            } else {
                return Some(e);
            }
        }
    }

    fn term(&mut self) -> Option<Expr> {
        let mut e = self.unary()?;
        let mut chain = Chain::default();
        loop {
            if self.eat('*') || self.eat_cmd(&["cdot", "times"]) {
                e = chain.link(Expr::Mul, e, self.unary()?)?;
            } else if self.eat('/') || self.eat_cmd(&["div"]) {
                e = chain.link(Expr::Div, e, self.unary()?)?;
            } else if self.starts_atom() {
                e = chain.link(Expr::Mul, e, self.power()?)?;
            } else {
                return Some(e);
            }
        }
    }

    fn unary(&mut self) -> Option<Expr> {
        if self.eat('-') {
            return Some(Expr::Neg(b(self.nested(Self::unary)?)));
        }
        if self.eat('+') {
            return self.nested(Self::unary);
        }
        self.power()
    }

    fn power(&mut self) -> Option<Expr> {
        let base = self.postfix()?;
        if self.eat('^') {
            let exp = if self.peek() == Some(&Tok::Sym('{')) {
                self.nested(Self::group)?
            } else {
                self.nested(Self::unary)?
            };
            return Some(Expr::Pow(b(base), b(exp)));
        }
        Some(base)
    }

    fn postfix(&mut self) -> Option<Expr> {
        let mut e = self.nested(Self::atom)?;
        let mut chain = Chain::default();
        loop {
            if self.eat('!') {
                e = chain.wrap(Expr::Fact, e)?;
            } else if self.eat('%') {
                e = chain.wrap(Expr::Percent, e)?;
            } else {
                return Some(e);
            }
        }
    }

    /// Whether the next token can begin a factor of an implicit product (`2x`, `x(y+1)`).
    fn starts_atom(&self) -> bool {
        match self.peek() {
            Some(Tok::Num(_) | Tok::Letter(_) | Tok::Word(_)) => true,
            Some(Tok::Sym(c)) => matches!(c, '(' | '[' | '{'),
            Some(Tok::Cmd(n)) => !matches!(n.as_str(), "cdot" | "times" | "div"),
            None => false,
        }
    }

    /// `{ expr }`
    fn group(&mut self) -> Option<Expr> {
        if !self.eat('{') {
            return None;
        }
        let e = self.sum()?;
        self.eat('}').then_some(e)
    }

    /// The raw text of a `_x` or `_{...}` subscript, to name a variable like `c_1`.
    fn subscript(&mut self) -> Option<String> {
        if !self.eat('_') {
            return Some(String::new());
        }
        let mut name = String::from("_");
        let mut depth = 0;
        loop {
            let t = self.next()?;
            match &t {
                Tok::Sym('{') => depth += 1,
                Tok::Sym('}') => depth -= 1,
                Tok::Num(x) => name.push_str(&x.to_string()),
                Tok::Letter(c) => name.push(*c),
                Tok::Word(w) => name.push_str(w),
                Tok::Cmd(c) => name.push_str(c),
                Tok::Sym(c) => name.push(*c),
            }
            if depth == 0 {
                return Some(name);
            }
        }
    }

    fn atom(&mut self) -> Option<Expr> {
        match self.next()? {
            Tok::Num(x) => {
                // `204_5`: a number written in base 5; math-verify keeps the digits, so do we.
                self.subscript()?;
                Some(Expr::Num(x))
            }
            Tok::Letter(c) => {
                let sub = self.subscript()?;
                Some(match (c, sub.is_empty()) {
                    ('i', true) => Expr::Const(C::I),
                    ('e', true) => Expr::Const(C::real(std::f64::consts::E)),
                    _ => Expr::Var(format!("{c}{sub}")),
                })
            }
            Tok::Word(w) => self.call(w),
            Tok::Sym(open @ ('(' | '[' | '{' | '|')) => {
                let e = self.sum()?;
                let closed = match open {
                    '|' => self.eat('|'),
                    '{' => self.eat('}'),
                    _ => self.eat(')') || self.eat(']'),
                };
                closed.then(|| {
                    if open == '|' {
                        Expr::Call(Func::Abs, b(e))
                    } else {
                        e
                    }
                })
            }
            Tok::Cmd(name) => self.command(&name),
            Tok::Sym(_) => None,
        }
    }

    fn command(&mut self, name: &str) -> Option<Expr> {
        match name {
            "frac" | "dfrac" | "tfrac" => {
                let num = self.group()?;
                Some(Expr::Div(b(num), b(self.group()?)))
            }
            "sqrt" => {
                if self.eat('[') {
                    let n = self.sum()?;
                    if !self.eat(']') {
                        return None;
                    }
                    let x = self.root_arg()?;
                    return Some(Expr::Pow(b(x), b(Expr::Div(b(Expr::Num(1.0)), b(n)))));
                }
                Some(Expr::Call(Func::Sqrt, b(self.root_arg()?)))
            }
            "pi" => Some(Expr::Const(C::real(std::f64::consts::PI))),
            "infty" | "infin" => Some(Expr::Const(C::real(f64::INFINITY))),
            "mathbf" | "boldsymbol" | "vec" | "hat" | "bar" | "overline" | "mathbb" | "mathcal"
            | "tilde" => {
                let start = self.pos;
                self.group()?;
                Some(Expr::Var(format!(
                    "{name}{:?}",
                    &self.toks[start..self.pos]
                )))
            }
            n if GREEK.contains(&n) => {
                let sub = self.subscript()?;
                Some(Expr::Var(format!("{n}{sub}")))
            }
            n => {
                let f = FUNCS.iter().find(|f| **f == n)?;
                self.call(f)
            }
        }
    }

    fn root_arg(&mut self) -> Option<Expr> {
        if self.peek() == Some(&Tok::Sym('{')) {
            self.group()
        } else {
            self.postfix()
        }
    }

    /// A function application: `\sin^2 x`, `\log_2 8`, `\ln(x+1)`, `\cos 2x`.
    fn call(&mut self, name: &str) -> Option<Expr> {
        let mut power = None;
        let mut base = None;
        loop {
            if self.eat('^') {
                power = Some(if self.peek() == Some(&Tok::Sym('{')) {
                    self.group()?
                } else {
                    self.postfix()?
                });
            } else if self.peek() == Some(&Tok::Sym('_')) && name == "log" {
                self.pos += 1;
                base = Some(if self.peek() == Some(&Tok::Sym('{')) {
                    self.group()?
                } else {
                    self.postfix()?
                });
            } else {
                break;
            }
        }
        let arg = if matches!(self.peek(), Some(Tok::Sym('('))) {
            self.power()?
        } else {
            // Unparenthesised: the implicit product that follows (`\sin 2x` is sin(2x)).
            let mut a = self.power()?;
            let mut chain = Chain::default();
            while self.starts_atom()
                && !matches!(self.peek(), Some(Tok::Word(_)))
                && !self.next_is_func_cmd()
            {
                a = chain.link(Expr::Mul, a, self.power()?)?;
            }
            a
        };
        let mut e = match base {
            Some(base) => Expr::Div(
                b(Expr::Call(Func::Ln, b(arg))),
                b(Expr::Call(Func::Ln, b(base))),
            ),
            None => Expr::Call(func_named(name)?, b(arg)),
        };
        if let Some(p) = power {
            e = Expr::Pow(b(e), b(p));
        }
        Some(e)
    }

    fn next_is_func_cmd(&self) -> bool {
        matches!(self.peek(), Some(Tok::Cmd(n)) if FUNCS.contains(&n.as_str()))
    }
}

impl Expr {
    /// The value at `vars`; `pct` is what `%` multiplies by (0.01 or 1).
    pub fn eval(&self, vars: &HashMap<String, C>, pct: f64) -> C {
        use Expr::*;
        match self {
            Num(x) => C::real(*x),
            Const(c) => *c,
            Var(v) => vars.get(v).copied().unwrap_or(C::real(f64::NAN)),
            Neg(a) => -a.eval(vars, pct),
            Add(a, b) => a.eval(vars, pct) + b.eval(vars, pct),
            Sub(a, b) => a.eval(vars, pct) - b.eval(vars, pct),
            Mul(a, b) => a.eval(vars, pct) * b.eval(vars, pct),
            Div(a, b) => a.eval(vars, pct) / b.eval(vars, pct),
            Pow(a, b) => a.eval(vars, pct).pow(b.eval(vars, pct)),
            Fact(a) => factorial(a.eval(vars, pct)),
            Percent(a) => a.eval(vars, pct) * C::real(pct),
            Call(f, a) => {
                let x = a.eval(vars, pct);
                let one = C::real(1.0);
                match f {
                    Func::Sin => x.sin(),
                    Func::Cos => x.cos(),
                    Func::Tan => x.sin() / x.cos(),
                    Func::Cot => x.cos() / x.sin(),
                    Func::Sec => one / x.cos(),
                    Func::Csc => one / x.sin(),
                    Func::Sinh => (x.exp() - (-x).exp()) * C::real(0.5),
                    Func::Cosh => (x.exp() + (-x).exp()) * C::real(0.5),
                    Func::Tanh => (x.exp() - (-x).exp()) / (x.exp() + (-x).exp()),
                    Func::Asin => x.real_fn(f64::asin),
                    Func::Acos => x.real_fn(f64::acos),
                    Func::Atan => x.real_fn(f64::atan),
                    Func::Ln => x.ln(),
                    Func::Log10 => x.ln() / C::real(std::f64::consts::LN_10),
                    Func::Exp => x.exp(),
                    Func::Sqrt => x.sqrt(),
                    Func::Abs => C::real(x.abs()),
                }
            }
        }
    }

    /// Levels below the root: 0 for a leaf.
    fn depth(&self) -> usize {
        use Expr::*;
        match self {
            Num(_) | Const(_) | Var(_) => 0,
            Neg(a) | Call(_, a) | Fact(a) | Percent(a) => 1 + a.depth(),
            Add(a, b) | Sub(a, b) | Mul(a, b) | Div(a, b) | Pow(a, b) => {
                1 + a.depth().max(b.depth())
            }
        }
    }

    /// Names of the free variables.
    pub fn vars(&self, out: &mut BTreeSet<String>) {
        use Expr::*;
        match self {
            Num(_) | Const(_) => {}
            Var(v) => {
                out.insert(v.clone());
            }
            Neg(a) | Call(_, a) | Fact(a) | Percent(a) => a.vars(out),
            Add(a, b) | Sub(a, b) | Mul(a, b) | Div(a, b) | Pow(a, b) => {
                a.vars(out);
                b.vars(out);
            }
        }
    }

    /// Whether the expression names infinity (`\\infty`, `∞`), as opposed to a value that only
    /// overflows f64 (`10^{400}`).
    pub fn has_infinity(&self) -> bool {
        use Expr::*;
        match self {
            Const(c) => !c.is_finite(),
            Num(_) | Var(_) => false,
            Percent(a) | Neg(a) | Call(_, a) | Fact(a) => a.has_infinity(),
            Add(a, b) | Sub(a, b) | Mul(a, b) | Div(a, b) | Pow(a, b) => {
                a.has_infinity() || b.has_infinity()
            }
        }
    }

    pub fn has_percent(&self) -> bool {
        use Expr::*;
        match self {
            Percent(_) => true,
            Num(_) | Const(_) | Var(_) => false,
            Neg(a) | Call(_, a) | Fact(a) => a.has_percent(),
            Add(a, b) | Sub(a, b) | Mul(a, b) | Div(a, b) | Pow(a, b) => {
                a.has_percent() || b.has_percent()
            }
        }
    }
}
