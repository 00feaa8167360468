//! API throttling: a token bucket per (principal, operation), with AWS's published rates
//! for the MicroVM operations as defaults.
//!
//! Only signed callers reach the throttle, so its table holds at most one entry per known
//! principal and operation; entries that are full again (idle for long enough) are dropped
//! when the table is swept, so it shrinks back as callers go quiet.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_api::{ApiError, Operation};

/// AWS's default request rates (per second, per account) for lambda-microvms operations.
pub const AWS_RATES: &[(&str, f64)] = &[
    ("RunMicrovm", 5.0),
    ("ResumeMicrovm", 5.0),
    ("SuspendMicrovm", 2.0),
    ("TerminateMicrovm", 10.0),
    ("GetMicrovm", 100.0),
    ("CreateMicrovmAuthToken", 50.0),
    ("CreateMicrovmShellAuthToken", 5.0),
];

/// The service code throttling and quota errors name.
pub const SERVICE_CODE: &str = "lambda-microvms";

/// Sweep the table once it holds this many entries.
const SWEEP_AT: usize = 4096;

/// One rate: `per_second` steady, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per second refilled.
    pub per_second: f64,
    /// Bucket size: requests admitted back to back after a quiet spell.
    pub burst: f64,
}

impl Rate {
    /// A rate whose burst equals one second's worth (at least one request).
    pub fn per_second(per_second: f64) -> Rate {
        Rate {
            per_second,
            burst: per_second.max(1.0),
        }
    }
}

/// `--throttle` entry: `OPERATION=RATE[/BURST]`; `*` names every operation without its own
/// rate; a rate of 0 turns throttling off for that operation.
#[derive(Debug, Clone, PartialEq)]
pub struct ThrottleRule {
    /// The operation's name (`RunMicrovm`), or `*`.
    pub operation: String,
    /// Its rate; `None` = unthrottled.
    pub rate: Option<Rate>,
}

impl FromStr for ThrottleRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!(
                "--throttle {s:?}: expected OPERATION=RATE[/BURST], e.g. RunMicrovm=5 or \
                 GetMicrovm=100/200 or '*=20' (RATE 0 = unthrottled)"
            )
        };
        let (op, value) = s.split_once('=').ok_or_else(usage)?;
        let op = op.trim();
        if op != "*" && Operation::from_name(op).is_none() {
            return Err(format!(
                "--throttle {s:?}: {op} is not a lambda-microvms operation (names as in the API, e.g. GetMicrovm)"
            ));
        }
        let (rate, burst) = match value.split_once('/') {
            Some((r, b)) => (r, Some(b)),
            None => (value, None),
        };
        let number = |t: &str| {
            t.trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(usage)
        };
        let per_second = number(rate)?;
        let rate = if per_second == 0.0 {
            None
        } else {
            let mut r = Rate::per_second(per_second);
            if let Some(b) = burst {
                r.burst = number(b)?.max(1.0);
            }
            Some(r)
        };
        Ok(ThrottleRule {
            operation: op.to_string(),
            rate,
        })
    }
}

/// Which rate each operation gets: AWS's defaults, then the rules in order.
#[derive(Debug, Clone, Default)]
pub struct Rates {
    by_operation: HashMap<String, Option<Rate>>,
    others: Option<Rate>,
}

impl Rates {
    /// AWS's defaults with `rules` applied over them (later rules win).
    pub fn new(rules: &[ThrottleRule]) -> Rates {
        let mut rates = Rates::default();
        for (op, r) in AWS_RATES {
            rates
                .by_operation
                .insert(op.to_string(), Some(Rate::per_second(*r)));
        }
        for rule in rules {
            if rule.operation == "*" {
                rates.others = rule.rate;
            } else {
                rates.by_operation.insert(rule.operation.clone(), rule.rate);
            }
        }
        rates
    }

    /// The rate of `operation` (`None` = unthrottled).
    pub fn of(&self, operation: &str) -> Option<Rate> {
        match self.by_operation.get(operation) {
            Some(rate) => *rate,
            None => self.others,
        }
    }

    /// Every operation with a rate of its own, for the quotas listing.
    pub fn listed(&self) -> Vec<(String, Rate)> {
        let mut v: Vec<(String, Rate)> = self
            .by_operation
            .iter()
            .filter_map(|(op, r)| r.map(|r| (op.clone(), r)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The rate of operations not listed, if any.
    pub fn others(&self) -> Option<Rate> {
        self.others
    }
}

/// A token bucket: `tokens` left at `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes one token at `now`, or says how long until one is there.
    fn take(&mut self, now: Instant, rate: Rate) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / rate.per_second,
            ))
        }
    }

    /// Whether the bucket would be full at `now` (so forgetting it changes nothing).
    fn full_at(&self, now: Instant, rate: Rate) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * rate.per_second >= rate.burst
    }
}

/// The API's throttle: one bucket per (principal, operation).
pub struct Throttle {
    rates: Rates,
    buckets: Mutex<HashMap<(String, &'static str), Bucket>>,
}

impl Throttle {
    /// A throttle applying `rates`.
    pub fn new(rates: Rates) -> Throttle {
        Throttle {
            rates,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The rates it applies.
    pub fn rates(&self) -> &Rates {
        &self.rates
    }

    /// Admits one `operation` call by `principal` (an authenticated caller), or answers the
    /// `ThrottlingException` with how long to wait.
    pub fn admit(&self, principal: &str, operation: Operation) -> Result<(), ApiError> {
        self.admit_at(principal, operation, Instant::now())
    }

    fn admit_at(
        &self,
        principal: &str,
        operation: Operation,
        now: Instant,
    ) -> Result<(), ApiError> {
        let name = operation.name();
        let Some(rate) = self.rates.of(name) else {
            return Ok(());
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= SWEEP_AT {
            buckets
                .retain(|(_, op), b| self.rates.of(op).is_some_and(|rate| !b.full_at(now, rate)));
        }
        let bucket = buckets
            .entry((principal.to_string(), name))
            .or_insert(Bucket {
                tokens: rate.burst,
                at: now,
            });
        bucket.take(now, rate).map_err(|wait| ApiError::Throttling {
            message: format!(
                "Rate exceeded: {name} is limited to {} requests per second per principal \
                 (burst {}); retry after the Retry-After seconds",
                rate.per_second, rate.burst
            ),
            service_code: Some(SERVICE_CODE.to_string()),
            quota_code: Some(format!("{name}RequestsPerSecond")),
            retry_after_seconds: Some(wait.as_secs_f64().ceil().max(1.0) as i32),
        })
    }

    /// How many buckets it holds (for tests).
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether it holds no bucket.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(rules: &[&str]) -> Throttle {
        let rules: Vec<ThrottleRule> = rules.iter().map(|r| r.parse().expect("rule")).collect();
        Throttle::new(Rates::new(&rules))
    }

    #[test]
    fn admit_when_burst_spent_then_throttled_with_retry_after() {
        let t = throttle(&[]);
        let now = Instant::now();
        for _ in 0..2 {
            t.admit_at("alice", Operation::SuspendMicrovm, now)
                .expect("within the burst");
        }

        let refused = t.admit_at("alice", Operation::SuspendMicrovm, now);

        let err = refused.expect_err("third call in the same instant");
        assert_eq!(err.error_type(), "ThrottlingException");
        assert_eq!(err.status(), 429);
        assert_eq!(err.retry_after_seconds(), Some(1));
        assert_eq!(
            err.body()["quotaCode"],
            "SuspendMicrovmRequestsPerSecond",
            "{}",
            err.body()
        );
    }

    #[test]
    fn admit_when_time_passes_then_tokens_come_back() {
        let t = throttle(&["RunMicrovm=2"]);
        let now = Instant::now();
        t.admit_at("alice", Operation::RunMicrovm, now).expect("1");
        t.admit_at("alice", Operation::RunMicrovm, now).expect("2");
        assert!(t.admit_at("alice", Operation::RunMicrovm, now).is_err());

        let later = t.admit_at(
            "alice",
            Operation::RunMicrovm,
            now + Duration::from_millis(500),
        );

        assert!(later.is_ok(), "{later:?}");
    }

    #[test]
    fn admit_when_other_principal_or_operation_then_own_bucket() {
        let t = throttle(&["GetMicrovm=1"]);
        let now = Instant::now();
        t.admit_at("alice", Operation::GetMicrovm, now)
            .expect("alice");

        assert!(t.admit_at("alice", Operation::GetMicrovm, now).is_err());
        assert!(t.admit_at("bob", Operation::GetMicrovm, now).is_ok());
        assert!(t.admit_at("alice", Operation::RunMicrovm, now).is_ok());
    }

    #[test]
    fn admit_when_operation_unlisted_then_unthrottled_and_no_entry() {
        let t = throttle(&[]);
        let now = Instant::now();
        for _ in 0..1000 {
            t.admit_at("alice", Operation::ListMicrovms, now)
                .expect("unthrottled");
        }

        assert!(t.is_empty());
    }

    #[test]
    fn admit_when_star_rule_then_unlisted_operations_throttled() {
        let t = throttle(&["*=1"]);
        let now = Instant::now();
        t.admit_at("alice", Operation::ListMicrovms, now)
            .expect("1");

        assert!(t.admit_at("alice", Operation::ListMicrovms, now).is_err());
        assert!(t.admit_at("alice", Operation::GetMicrovm, now).is_ok());
    }

    #[test]
    fn admit_when_rate_zero_then_unthrottled() {
        let t = throttle(&["SuspendMicrovm=0"]);
        let now = Instant::now();
        for _ in 0..100 {
            t.admit_at("alice", Operation::SuspendMicrovm, now)
                .expect("unthrottled");
        }
    }

    #[test]
    fn admit_when_table_large_then_full_buckets_swept() {
        let t = throttle(&["GetMicrovm=1000"]);
        let now = Instant::now();
        for i in 0..SWEEP_AT {
            t.admit_at(&format!("p{i}"), Operation::GetMicrovm, now)
                .expect("admitted");
        }

        t.admit_at("last", Operation::GetMicrovm, now + Duration::from_secs(5))
            .expect("admitted");

        assert_eq!(t.len(), 1);
    }

    #[test]
    fn rule_when_malformed_then_says_the_form() {
        for bad in [
            "RunMicrovm",
            "RunMicrovm=x",
            "Nope=1",
            "RunMicrovm=-1",
            "RunMicrovm=1/x",
        ] {
            let err = bad.parse::<ThrottleRule>().expect_err(bad);
            assert!(err.contains("--throttle"), "{err}");
        }
    }

    #[test]
    fn rule_when_burst_given_then_used() {
        let rule: ThrottleRule = "GetMicrovm=10/40".parse().expect("rule");

        assert_eq!(
            rule.rate,
            Some(Rate {
                per_second: 10.0,
                burst: 40.0
            })
        );
    }
}
