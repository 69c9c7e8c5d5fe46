//! The one error shape of the API: `{"error": {"message", "type", "code"}}` (OpenAI's),
//! with an optional `details` array for per-item validation errors.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// One problem with one item of a request (an event of a batch, a query parameter).
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct ErrorDetail {
    /// Index of the event in the batch, when the request carried events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The event id, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The offending field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorObject,
}

/// The error object.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorObject {
    /// Human-readable explanation.
    pub message: String,
    /// Class of error: `invalid_request_error`, `authentication_error`,
    /// `permission_error`, `not_found_error`, `conflict_error`, `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Machine-readable code.
    pub code: String,
    /// Per-item problems (422 on event batches).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ErrorDetail>,
}

/// An error the API answers with.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: String,
    message: String,
    details: Vec<ErrorDetail>,
    /// Seconds for a `Retry-After` header.
    retry_after: Option<u32>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            code: code.to_string(),
            message: message.into(),
            details: Vec::new(),
            retry_after: None,
        }
    }

    /// 400: malformed request.
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }
    /// 401: no or bad credentials.
    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            "missing or invalid API key: send Authorization: Bearer <key>",
        )
    }
    /// 403: authenticated but not allowed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "forbidden",
            message,
        )
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "not_found",
            message,
        )
    }
    /// 409.
    pub fn conflict(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict_error", code, message)
    }
    /// 413.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "payload_too_large",
            message,
        )
    }
    /// 422 with per-item details.
    pub fn unprocessable(
        code: &str,
        message: impl Into<String>,
        details: Vec<ErrorDetail>,
    ) -> Self {
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            code,
            message,
        );
        e.details = details;
        e
    }
    /// 502: an upstream failed.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "upstream_error",
            message,
        )
    }
    /// 504: an upstream timed out.
    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            "upstream_timeout",
            message,
        )
    }
    /// 402: not enough prepaid credit.
    pub fn insufficient_credits(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_quota",
            "insufficient_credits",
            message,
        )
    }
    /// Replaces the machine-readable code.
    pub fn with_code(mut self, code: &str) -> Self {
        self.code = code.to_string();
        self
    }
    /// 503 with `Retry-After`: too many calls in flight.
    pub fn overloaded(message: impl Into<String>) -> Response {
        let mut r = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "overloaded",
            message,
        )
        .into_response();
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
        r
    }
    /// 429 with `Retry-After` (seconds): a per-key rate limit.
    pub fn rate_limited(message: impl Into<String>, retry_after_secs: u64) -> Response {
        let mut r = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limit_exceeded",
            message,
        )
        .into_response();
        if let Ok(v) = axum::http::HeaderValue::from_str(&retry_after_secs.to_string()) {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        r
    }
    /// 503 with `Retry-After: 1` (the database cannot be reached, …).
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "unavailable",
            message,
        );
        e.retry_after = Some(1);
        e
    }
    /// 500: the cause is logged, never sent.
    pub fn internal(err: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            "internal error; the cause was logged",
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorObject {
                message: self.message,
                kind: self.kind.to_string(),
                code: self.code,
                details: self.details,
            },
        };
        let mut r = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        r
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        let status = r.status();
        let message = r.body_text();
        match status {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(message),
            StatusCode::UNPROCESSABLE_ENTITY => {
                ApiError::unprocessable("invalid_body", message, Vec::new())
            }
            _ => ApiError::bad_request("invalid_body", message),
        }
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(r: axum::extract::rejection::BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!("request body too large: {}", r.body_text()))
        } else {
            ApiError::bad_request("invalid_body", r.body_text())
        }
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::bad_request("invalid_query", r.body_text())
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> Self {
        ApiError::bad_request("invalid_path", r.body_text())
    }
}

/// JSON body extractor whose rejections use the API's error shape.
#[derive(Debug, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        Json(self.0).into_response()
    }
}

/// Business errors become API errors here, and only here: the service says what went wrong,
/// this says which status and code the API answers with.
impl From<crate::service::ServiceError> for ApiError {
    fn from(e: crate::service::ServiceError) -> Self {
        use crate::service::ServiceError;
        match e {
            ServiceError::Invalid(m) => ApiError::unprocessable("invalid_request", m, Vec::new()),
            ServiceError::InvalidEvents(list) => {
                let n = list.len();
                ApiError::unprocessable(
                    "invalid_events",
                    format!("{n} events are invalid; nothing was recorded"),
                    list.into_iter()
                        .map(|(index, id, field, message)| ErrorDetail {
                            index: Some(index),
                            id,
                            field,
                            message,
                        })
                        .collect(),
                )
            }
            ServiceError::InvalidField {
                code,
                field,
                message,
            } => ApiError::unprocessable(
                code,
                format!("{field}: {message}"),
                vec![ErrorDetail {
                    index: None,
                    id: None,
                    field,
                    message,
                }],
            ),
            ServiceError::BadQuery(m) => ApiError::bad_request("invalid_query", m),
            ServiceError::NotFound(m) => ApiError::not_found(m),
            ServiceError::EventConflict(id) => ApiError::conflict(
                "event_id_conflict",
                format!(
                    "event id {id:?} was already recorded with different content; nothing was recorded"
                ),
            ),
            ServiceError::Conflict(m) => ApiError::conflict("conflict", m),
            ServiceError::Internal(e) if fatura_store::is_unreachable(&e) => {
                tracing::warn!(error = %format!("{e:#}"), "database unreachable");
                ApiError::unavailable(
                    "the database is unavailable; nothing was changed; retry shortly",
                )
            }
            ServiceError::Internal(e) => ApiError::internal(&format!("{e:#}")),
        }
    }
}
