//! Numbers into text: medians with ranges, percentiles, thousands separators.

/// Median, min and max of a few repeats.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

impl Spread {
    /// The spread of one figure taken from each of `items` (bursts, deliveries, rounds).
    pub fn over<T>(items: &[T], figure: impl Fn(&T) -> f64) -> Self {
        Self::of(&items.iter().map(figure).collect::<Vec<_>>())
    }

    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            count: n,
        }
    }

    /// `1,234 [1,100–1,300]` (no range for a single value).
    pub fn whole(&self) -> String {
        if self.count <= 1 {
            thousands(self.median)
        } else {
            format!(
                "{} [{}–{}]",
                thousands(self.median),
                thousands(self.min),
                thousands(self.max)
            )
        }
    }

    /// Percentages of a ratio spread: `47% [44–49%]`.
    pub fn percent(&self) -> String {
        if self.count <= 1 {
            format!("{:.0}%", self.median * 100.0)
        } else {
            format!(
                "{:.0}% [{:.0}–{:.0}%]",
                self.median * 100.0,
                self.min * 100.0,
                self.max * 100.0
            )
        }
    }

    /// Factors: `2.6× [2.4–2.9×]`.
    pub fn times(&self) -> String {
        if self.count <= 1 {
            format!("{:.2}×", self.median)
        } else {
            format!("{:.2}× [{:.2}–{:.2}×]", self.median, self.min, self.max)
        }
    }
}

/// Latency percentiles, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    pub p50: i64,
    pub p99: i64,
    pub max: i64,
    pub count: usize,
}

impl Percentiles {
    pub fn of(mut values: Vec<i64>) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_unstable();
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: values[values.len() - 1],
            count: values.len(),
        }
    }

    /// `0.42 / 1.90 / 7.31 ms`
    pub fn millis(&self) -> String {
        format!("{} / {} / {} ms", ms(self.p50), ms(self.p99), ms(self.max))
    }
}

pub fn ms(micros: i64) -> String {
    format!("{:.2}", micros as f64 / 1000.0)
}

/// `12345.6` → `12,346`.
pub fn thousands(value: f64) -> String {
    let rounded = value.round() as i64;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 {
        format!("-{out}")
    } else {
        out
    }
}

pub fn yes_no(met: bool) -> &'static str {
    if met {
        "**yes**"
    } else {
        "**no**"
    }
}
