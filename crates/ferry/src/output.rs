//! Tables for people, JSON for scripts, CSV for spreadsheets.

use serde::Serialize;

use crate::Output;

/// Prints `rows` as a table or CSV with `headers`, or `value` as JSON.
pub fn print<T: Serialize>(out: Output, value: &T, headers: &[&str], rows: Vec<Vec<String>>) {
    match out {
        Output::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into())
            )
        }
        Output::Table => print!("{}", table(headers, &rows)),
        Output::Csv => print!("{}", csv(headers, &rows)),
    }
}

/// Formats CSV (RFC 4180: a cell with a comma, quote or line break is quoted).
pub fn csv(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cell = |c: &str| {
        if c.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", c.replace('"', "\"\""))
        } else {
            c.to_string()
        }
    };
    let mut s = String::new();
    s.push_str(
        &headers
            .iter()
            .map(|h| cell(h))
            .collect::<Vec<_>>()
            .join(","),
    );
    s.push('\n');
    for r in rows {
        s.push_str(&r.iter().map(|c| cell(c)).collect::<Vec<_>>().join(","));
        s.push('\n');
    }
    s
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

    #[test]
    fn csv_quotes_what_needs_it() {
        let t = super::csv(
            &["A", "B"],
            &[
                vec!["x,y".into(), "say \"hi\"".into()],
                vec!["1".into(), "2".into()],
            ],
        );
        assert_eq!(t, "A,B\n\"x,y\",\"say \"\"hi\"\"\"\n1,2\n");
    }
}
