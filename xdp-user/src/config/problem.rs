//! Problems of a config, each at its location, and every type error of a
//! file that does not deserialize.

use std::fmt;

use serde::Serialize;

use super::*;

/// One problem found in a config: where, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub location: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.reason)
    }
}

/// Every problem of a config, or of the file holding it.
#[derive(Debug)]
pub struct Invalid(pub Vec<Problem>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} problem{} in the config:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.0 {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Invalid {}

/// Where a span of `text` starts, as an editor shows it.
fn line_and_column(text: &str, at: usize) -> String {
    let line = text[..at].matches('\n').count() + 1;
    let col = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {col}")
}

/// Every type error of a file that does not deserialize, not only the
/// first: each error's key line is blanked (line numbers stay) and the
/// text parsed again, until it parses, a syntax error or a table header
/// is at fault, or a blanked key turns out to be required.
pub(super) fn type_errors(text: &str) -> Vec<Problem> {
    const MOST: usize = 100;
    let mut text = text.to_owned();
    let mut problems = Vec::new();
    let mut blanked: Vec<String> = Vec::new();
    while problems.len() < MOST {
        let Err(e) = toml::from_str::<Config>(&text) else {
            break;
        };
        let message = e.message().to_owned();
        // A key blanked here is missing now: no problem of its own.
        if message.starts_with("missing field")
            && blanked.iter().any(|k| message.contains(&format!("`{k}`")))
        {
            break;
        }
        let Some(span) = e.span() else {
            problems.push(Problem {
                location: "file".into(),
                reason: message,
            });
            break;
        };
        problems.push(Problem {
            location: line_and_column(&text, span.start),
            reason: message,
        });
        let start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
        let end = text[span.start..]
            .find('\n')
            .map_or(text.len(), |i| span.start + i);
        let line = text[start..end].trim();
        let Some((key, _)) = line.split_once('=').filter(|_| !line.starts_with('[')) else {
            break;
        };
        blanked.push(key.trim().trim_matches('"').to_owned());
        text.replace_range(start..end, "");
    }
    problems
}
