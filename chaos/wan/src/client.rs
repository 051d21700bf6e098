//! A blocking client of the control API, for processes that drive an emulator running
//! elsewhere (the chaos runner, benchmarks). In-process users call [`crate::Wan`] directly.

use std::net::SocketAddr;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::control::{LinkJson, LinkUpdate, ResetJson};
use crate::params::Partition;

/// Time limit of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A control API request that failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error status; `message` is its `error` field.
    #[error("{method} {url}: HTTP {status}: {message}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        message: String,
    },
    #[error("{method} {url}: {source}")]
    Transport {
        method: &'static str,
        url: String,
        source: Box<ureq::Transport>,
    },
    #[error("{method} {url}: decode answer: {source}")]
    Decode {
        method: &'static str,
        url: String,
        source: std::io::Error,
    },
}

/// Client of one emulator's control API.
#[derive(Clone, Debug)]
pub struct ControlClient {
    base: String,
    agent: ureq::Agent,
}

impl ControlClient {
    pub fn new(addr: SocketAddr) -> Self {
        ControlClient::with_base_url(format!("http://{addr}"))
    }

    /// `base` without a trailing slash, e.g. `http://127.0.0.1:7000`.
    pub fn with_base_url(base: impl Into<String>) -> Self {
        ControlClient {
            base: base.into(),
            agent: ureq::AgentBuilder::new().timeout(REQUEST_TIMEOUT).build(),
        }
    }

    pub fn links(&self) -> Result<Vec<LinkJson>, ClientError> {
        self.call("GET", "/v1/links", None)
    }

    pub fn link(&self, from: &str, to: &str) -> Result<LinkJson, ClientError> {
        self.call("GET", &format!("/v1/links/{from}/{to}"), None)
    }

    /// Applies a partial update to link `from → to`; returns the link after it.
    pub fn update(
        &self,
        from: &str,
        to: &str,
        update: &LinkUpdate,
    ) -> Result<LinkJson, ClientError> {
        let body = serde_json::to_value(update).unwrap_or_default();
        self.call("PUT", &format!("/v1/links/{from}/{to}"), Some(body))
    }

    pub fn partition(
        &self,
        from: &str,
        to: &str,
        partition: Partition,
    ) -> Result<LinkJson, ClientError> {
        let update = LinkUpdate {
            partition: Some(partition),
            ..LinkUpdate::default()
        };
        self.update(from, to, &update)
    }

    /// Resets every connection between the two sites; returns how many.
    pub fn reset(&self, a: &str, b: &str) -> Result<usize, ClientError> {
        let r: ResetJson = self.call("POST", &format!("/v1/links/{a}/{b}/reset"), None)?;
        Ok(r.connections_reset)
    }

    pub fn apply_profile(&self, name: &str) -> Result<Vec<LinkJson>, ClientError> {
        self.call("POST", &format!("/v1/profile/{name}"), None)
    }

    pub fn heal(&self) -> Result<Vec<LinkJson>, ClientError> {
        self.call("POST", "/v1/heal", None)
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let request = self.agent.request(method, &url);
        let answer = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        match answer {
            Ok(response) => response.into_json().map_err(|source| ClientError::Decode {
                method,
                url,
                source,
            }),
            Err(ureq::Error::Status(status, response)) => {
                let text = response.into_string().unwrap_or_default();
                let message = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                    .unwrap_or(text);
                Err(ClientError::Status {
                    method,
                    url,
                    status,
                    message,
                })
            }
            Err(ureq::Error::Transport(t)) => Err(ClientError::Transport {
                method,
                url,
                source: Box::new(t),
            }),
        }
    }
}
