//! Complex arithmetic for evaluating answers, and the tolerance that decides "same number".
//!
//! Complex because gold answers hold `i` (`-2 + 7i`) and because a square root or logarithm of a
//! negative value at a random evaluation point must not turn one side into NaN.

use std::ops::{Add, Div, Mul, Neg, Sub};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct C {
    pub re: f64,
    pub im: f64,
}

impl C {
    pub const fn real(re: f64) -> C {
        C { re, im: 0.0 }
    }
    pub const I: C = C { re: 0.0, im: 1.0 };

    pub fn abs(self) -> f64 {
        self.re.hypot(self.im)
    }
    pub fn is_finite(self) -> bool {
        self.re.is_finite() && self.im.is_finite()
    }
    pub fn exp(self) -> C {
        let m = self.re.exp();
        C {
            re: m * self.im.cos(),
            im: m * self.im.sin(),
        }
    }
    /// Principal branch.
    pub fn ln(self) -> C {
        C {
            re: self.abs().ln(),
            im: self.im.atan2(self.re),
        }
    }
    pub fn sqrt(self) -> C {
        if self.im == 0.0 && self.re >= 0.0 {
            return C::real(self.re.sqrt());
        }
        let r = self.abs();
        let re = ((r + self.re) / 2.0).sqrt();
        let im = ((r - self.re) / 2.0).sqrt().copysign(self.im);
        C { re, im }
    }
    pub fn pow(self, e: C) -> C {
        // Integer powers exactly, so (-2)^3 stays real and 0^2 is 0.
        if e.im == 0.0 && e.re.fract() == 0.0 && e.re.abs() <= 64.0 {
            let mut acc = C::real(1.0);
            for _ in 0..e.re.abs() as u32 {
                acc = acc * self;
            }
            return if e.re < 0.0 { C::real(1.0) / acc } else { acc };
        }
        if self.im == 0.0 && self.re > 0.0 && e.im == 0.0 {
            return C::real(self.re.powf(e.re));
        }
        if self == C::real(0.0) {
            return C::real(0.0);
        }
        (e * self.ln()).exp()
    }
    pub fn sin(self) -> C {
        C {
            re: self.re.sin() * self.im.cosh(),
            im: self.re.cos() * self.im.sinh(),
        }
    }
    pub fn cos(self) -> C {
        C {
            re: self.re.cos() * self.im.cosh(),
            im: -self.re.sin() * self.im.sinh(),
        }
    }
    /// Real-argument inverse trig; a complex argument gives NaN (the point is then skipped).
    pub fn real_fn(self, f: fn(f64) -> f64) -> C {
        if self.im.abs() > 1e-12 {
            return C::real(f64::NAN);
        }
        C::real(f(self.re))
    }
}

impl Add for C {
    type Output = C;
    fn add(self, o: C) -> C {
        C {
            re: self.re + o.re,
            im: self.im + o.im,
        }
    }
}
impl Sub for C {
    type Output = C;
    fn sub(self, o: C) -> C {
        C {
            re: self.re - o.re,
            im: self.im - o.im,
        }
    }
}
impl Mul for C {
    type Output = C;
    fn mul(self, o: C) -> C {
        C {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }
}
impl Div for C {
    type Output = C;
    fn div(self, o: C) -> C {
        let d = o.re * o.re + o.im * o.im;
        C {
            re: (self.re * o.re + self.im * o.im) / d,
            im: (self.im * o.re - self.re * o.im) / d,
        }
    }
}
impl Neg for C {
    type Output = C;
    fn neg(self) -> C {
        C {
            re: -self.re,
            im: -self.im,
        }
    }
}

/// Two values agree up to float error, or up to rounding at the sixth decimal: `1/3` matches
/// `0.333333` but not `0.333`, `4.33` does not match `4.333`, `1450001` does not match `1450000`
/// (math-verify compares with 6-decimal rounding in the same way). The rounding allowance is
/// also capped relative to the values, so `0.0000672` differs from `0.0000673`. Infinities match
/// when they point the same way.
pub fn close(a: C, b: C) -> bool {
    if !a.is_finite() || !b.is_finite() {
        return a.re == b.re && a.im == b.im;
    }
    let scale = a.abs().max(b.abs());
    let d = (a - b).abs();
    d <= 1e-11 * scale.max(1e-12) || (d <= 5.01e-7 && d <= 1e-5 * scale)
}

/// Factorial of a non-negative integer up to 170 (f64 range); anything else is NaN.
pub fn factorial(x: C) -> C {
    if x.im != 0.0 || x.re < 0.0 || x.re.fract() != 0.0 || x.re > 170.0 {
        return C::real(f64::NAN);
    }
    C::real((1..=x.re as u64).map(|k| k as f64).product())
}
