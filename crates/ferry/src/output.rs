//! Tables for people, JSON for scripts.

use serde::Serialize;

use crate::Output;

/// Prints `rows` as a table with `headers`, or `value` as JSON.
pub fn print<T: Serialize>(out: Output, value: &T, headers: &[&str], rows: Vec<Vec<String>>) {
    match out {
        Output::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into())
            )
        }
        Output::Table => print!("{}", table(headers, &rows)),
    }
}

/// Formats an aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    let mut s = String::new();
    let line = |cells: Vec<&str>, s: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<width$}", c, width = w[i]))
            .collect();
        s.push_str(parts.join("  ").trim_end());
        s.push('\n');
    };
    line(headers.to_vec(), &mut s);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut s);
    }
    s
}

/// Bytes as MiB with one decimal (`12.5 MiB`).
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_align() {
        let t = super::table(
            &["NAME", "STATE"],
            &[vec!["a-long-name".into(), "running".into()]],
        );
        assert_eq!(t, "NAME         STATE\na-long-name  running\n");
    }
}
