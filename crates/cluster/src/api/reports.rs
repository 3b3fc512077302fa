//! The reports' endpoints (`/v1/reports/…`) and the per-host utilization every agent serves
//! to the others (`/v1/internal/utilization`); the reports themselves are `crate::reports`.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde_json::json;

use super::{bad, ApiResult, Shared};
use crate::records::now;
use crate::reports::{migrations_report, parse_period, placement_report};
use crate::view::View;

/// The `since` query parameter as seconds back from now (`default` when absent).
fn period(q: &HashMap<String, String>, default: u64) -> Result<u64, super::ApiError> {
    for k in q.keys() {
        if k != "since" {
            return Err(bad(400, format!("unknown query parameter {k:?} (since)")));
        }
    }
    match q.get("since") {
        Some(s) => Ok(parse_period(s)?),
        None => Ok(default),
    }
}

/// `GET /v1/internal/utilization?since=UNIX`: this host's own history.
pub(super) async fn internal_utilization(
    State(a): Shared,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let since = match q.get("since") {
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| bad(400, format!("since={s:?}: a unix time")))?,
        None => 0,
    };
    Ok(Json(json!(a.utilization(since))))
}

/// `GET /v1/reports/utilization?since=1h`.
pub(super) async fn utilization(
    State(a): Shared,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let since = period(&q, 3600)?;
    Ok(Json(json!(a.utilization_report(since).await?)))
}

/// `GET /v1/reports/placement/{vm}`.
pub(super) async fn placement(State(a): Shared, Path(vm): Path<String>) -> ApiResult {
    let view = View::read(&a.db).await?;
    if !view.vms.contains_key(&vm) {
        return Err(bad(404, format!("no VM named {vm:?} in the cluster")));
    }
    let util = a.utilization_report(120).await?;
    Ok(Json(json!(placement_report(&view, &vm, &util)?)))
}

/// `GET /v1/reports/migrations?since=1d`.
pub(super) async fn migrations(
    State(a): Shared,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let since = period(&q, 86_400)?;
    let view = View::read(&a.db).await?;
    Ok(Json(json!(migrations_report(&view, since, now()))))
}
