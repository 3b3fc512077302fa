//! A blocking client for a host's REST API: what one agent uses to ask another (a receiving
//! worker for a migration), and what the CLI and the tests use. Errors are typed: a host that
//! cannot be reached, an answer that is not the API's JSON, or the API's own refusal with its
//! HTTP status and message.

use serde_json::Value;

/// How a call to a host's API failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No answer (connection refused, timeout, TLS).
    #[error("cannot reach {url}: {source}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// Why.
        #[source]
        source: Box<ureq::Error>,
    },
    /// An answer that is not JSON.
    #[error("bad answer from {url} ({status}): {source}")]
    BadAnswer {
        /// The URL called.
        url: String,
        /// The HTTP status.
        status: u16,
        /// Why it could not be read.
        #[source]
        source: Box<ureq::Error>,
    },
    /// The API refused: its status and the `error` it gave.
    #[error("{message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The API's message.
        message: String,
    },
}

impl PeerError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            PeerError::Refused { status, .. } | PeerError::BadAnswer { status, .. } => {
                Some(*status)
            }
            PeerError::Unreachable { .. } => None,
        }
    }
}

/// An HTTP method of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// POST (with a JSON body or none).
    Post,
    /// DELETE.
    Delete,
}

/// Calls `url` with bearer `token`: the JSON answer, or why not.
pub fn call(
    url: &str,
    token: &str,
    method: Method,
    body: Option<Value>,
) -> Result<Value, PeerError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into();
    let auth = format!("Bearer {token}");
    let resp = match method {
        Method::Get => agent.get(url).header("Authorization", &auth).call(),
        Method::Delete => agent.delete(url).header("Authorization", &auth).call(),
        Method::Post => {
            let req = agent.post(url).header("Authorization", &auth);
            match body {
                Some(b) => req.send_json(b),
                None => req.send_empty(),
            }
        }
    };
    let mut resp = resp.map_err(|e| PeerError::Unreachable {
        url: url.to_string(),
        source: Box::new(e),
    })?;
    let status = resp.status().as_u16();
    let v: Value = resp
        .body_mut()
        .read_json()
        .map_err(|e| PeerError::BadAnswer {
            url: url.to_string(),
            status,
            source: Box::new(e),
        })?;
    if (200..300).contains(&status) {
        Ok(v)
    } else {
        Err(PeerError::Refused {
            status,
            message: v["error"]
                .as_str()
                .map_or_else(|| format!("HTTP {status}"), String::from),
        })
    }
}
