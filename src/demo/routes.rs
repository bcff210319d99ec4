//! The demo's HTTP surface, mounted beside the relay's own routes only by `rls-relay demo`:
//!
//! - `GET /`: the page (two users side by side).
//! - `POST /demo/token/{user}`: a short-lived token for `alice` or `bob` (what a login
//!   would hand a front end).
//! - `GET /demo/api/snapshot`: the REST API's view for the bearer token's user:
//!   credentials, positions, balances and recent orders, read as `app_user` with the
//!   token's claims, so Postgres' policies decide, as they do for the relay.
//! - `POST /demo/api/orders`: place an order as the bearer token's user (RLS decides
//!   whether they may).
//! - `GET /demo/state`: the operator's view (every credential, owner, members).
//! - `POST /demo/share`, `POST /demo/transfer`: change who may see a credential.
//!
//! The control endpoints answer with `after`: the highest outbox id once the change has
//! committed. Every event with a higher id committed after the change, so it must reach
//! exactly the users the change allows (what the browser test checks).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use deadpool_postgres::Pool;
use jsonwebtoken::{EncodingKey, Header};
use serde::Deserialize;
use serde_json::{json, Value};

use super::trading::{World, USERS};
use crate::auth::{unix_now, Claims, Verifier};

const PAGE: &str = include_str!("page.html");

pub struct DemoState {
    /// Superuser connections: the operator's view and the control actions. The
    /// user-facing endpoints switch to `app_user` inside their transaction.
    pub pool: Pool,
    pub signer: EncodingKey,
    pub verifier: Arc<Verifier>,
    pub token_ttl: Duration,
    pub world: World,
}

type Shared = State<Arc<DemoState>>;

pub fn router(state: Arc<DemoState>) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/demo/token/{user}", post(token))
        .route("/demo/api/snapshot", get(snapshot))
        .route("/demo/api/orders", post(place_order))
        .route("/demo/state", get(world_state))
        .route("/demo/share", post(share))
        .route("/demo/transfer", post(transfer))
        .with_state(state)
}

/// Errors of the demo endpoints: a status and a message, logged once.
struct DemoError(StatusCode, String);

impl IntoResponse for DemoError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<tokio_postgres::Error> for DemoError {
    fn from(error: tokio_postgres::Error) -> Self {
        if error.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            // RLS refused the write: what a REST API answers with 403.
            return Self(
                StatusCode::FORBIDDEN,
                "refused by row-level security".into(),
            );
        }
        tracing::warn!(%error, "demo endpoint failed");
        Self(StatusCode::INTERNAL_SERVER_ERROR, "database error".into())
    }
}

impl From<deadpool_postgres::PoolError> for DemoError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        tracing::warn!(%error, "demo endpoint has no connection");
        Self(
            StatusCode::SERVICE_UNAVAILABLE,
            "no database connection".into(),
        )
    }
}

async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE))
}

async fn token(State(state): Shared, Path(user): Path<String>) -> Result<Json<Value>, DemoError> {
    if !USERS.iter().any(|(id, _)| *id == user) {
        return Err(DemoError(StatusCode::NOT_FOUND, "no such demo user".into()));
    }
    let now = unix_now();
    let exp = now + state.token_ttl.as_secs().max(1);
    let claims = json!({"sub": user, "role": "authenticated", "iat": now, "exp": exp});
    let token = jsonwebtoken::encode(&Header::default(), &claims, &state.signer).map_err(|e| {
        DemoError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot sign: {e}"),
        )
    })?;
    Ok(Json(json!({"token": token, "exp": exp})))
}

/// The verified claims of the request's bearer token.
async fn claims_of(state: &DemoState, headers: &HeaderMap) -> Result<Claims, DemoError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| DemoError(StatusCode::UNAUTHORIZED, "bearer token required".into()))?;
    state
        .verifier
        .verify(token.trim())
        .await
        .map(|identity| identity.claims)
        .map_err(|error| DemoError(StatusCode::UNAUTHORIZED, error.to_string()))
}

/// Starts a transaction as the REST API does: `app_user`, the claims transaction-local.
async fn as_user<'a>(
    client: &'a mut deadpool_postgres::Client,
    claims: &Claims,
) -> Result<deadpool_postgres::Transaction<'a>, DemoError> {
    let tx = client.transaction().await?;
    tx.batch_execute("set local role app_user").await?;
    tx.execute(
        "select set_config('request.jwt.claims', $1, true)",
        &[&claims.as_json()],
    )
    .await?;
    Ok(tx)
}

async fn snapshot(State(state): Shared, headers: HeaderMap) -> Result<Json<Value>, DemoError> {
    let claims = claims_of(&state, &headers).await?;
    let mut client = state.pool.get().await?;
    let tx = as_user(&mut client, &claims).await?;
    let row = tx
        .query_one(
            "select
               coalesce((select jsonb_agg(jsonb_build_object(
                           'id', c.id, 'label', c.label, 'owner_id', c.owner_id,
                           'owned', c.owner_id = app.current_user_id()) order by c.label)
                         from credentials c), '[]'),
               coalesce((select jsonb_agg(to_jsonb(p) order by p.id) from positions p), '[]'),
               coalesce((select jsonb_agg(to_jsonb(b)) from balances b), '[]'),
               coalesce((select jsonb_agg(to_jsonb(o) order by o.id desc)
                         from (select * from orders order by id desc limit 20) o), '[]')",
            &[],
        )
        .await?;
    tx.commit().await?;
    Ok(Json(json!({
        "credentials": row.get::<_, Value>(0),
        "positions": row.get::<_, Value>(1),
        "balances": row.get::<_, Value>(2),
        "orders": row.get::<_, Value>(3),
    })))
}

#[derive(Deserialize)]
struct OrderRequest {
    credential_id: String,
    symbol: String,
    side: String,
    qty: f64,
}

async fn place_order(
    State(state): Shared,
    headers: HeaderMap,
    Json(order): Json<OrderRequest>,
) -> Result<Json<Value>, DemoError> {
    let claims = claims_of(&state, &headers).await?;
    let sane_qty = order.qty > 0.0 && order.qty <= 1e6;
    if !(order.side == "buy" || order.side == "sell") || !sane_qty {
        return Err(DemoError(StatusCode::BAD_REQUEST, "bad order".into()));
    }
    let credential = uuid::Uuid::parse_str(&order.credential_id)
        .map_err(|_| {
            DemoError(
                StatusCode::BAD_REQUEST,
                "credential_id is not a uuid".into(),
            )
        })?
        .to_string();
    let mut client = state.pool.get().await?;
    let tx = as_user(&mut client, &claims).await?;
    let id: i64 = tx
        .query_one(
            "insert into orders (credential_id, symbol, side, qty)
             values ($1::text::uuid, $2, $3, $4::float8::numeric) returning id",
            &[
                &credential,
                &order.symbol,
                &order.side,
                &order.qty as &(dyn tokio_postgres::types::ToSql + Sync),
            ],
        )
        .await?
        .get(0);
    tx.commit().await?;
    Ok(Json(json!({"order_id": id})))
}

async fn world_state(State(state): Shared) -> Result<Json<Value>, DemoError> {
    let client = state.pool.get().await?;
    let credentials: Value = client
        .query_one(
            "select coalesce(jsonb_agg(jsonb_build_object(
                 'id', c.id, 'label', c.label, 'owner_id', c.owner_id,
                 'members', coalesce((select jsonb_agg(m.user_id order by m.user_id)
                                      from credential_members m where m.credential_id = c.id), '[]'))
                 order by c.label), '[]')
             from credentials c",
            &[],
        )
        .await?
        .get(0);
    Ok(Json(json!({
        "users": USERS.iter().map(|(id, name)| json!({"id": id, "name": name})).collect::<Vec<_>>(),
        "credentials": credentials,
        "shared_credential": state.world.shared,
        "transferable_credential": state.world.transferable,
    })))
}

/// The highest outbox id once a change has committed.
async fn outbox_position(client: &deadpool_postgres::Client) -> Result<i64, DemoError> {
    Ok(client
        .query_one("select coalesce(max(id), 0) from relay.outbox", &[])
        .await?
        .get(0))
}

#[derive(Deserialize)]
struct ShareRequest {
    shared: bool,
}

/// Shares Alice's family credential with Bob, or stops sharing it.
async fn share(
    State(state): Shared,
    Json(request): Json<ShareRequest>,
) -> Result<Json<Value>, DemoError> {
    let client = state.pool.get().await?;
    let sql = if request.shared {
        "insert into credential_members (credential_id, user_id) values ($1::text::uuid, 'bob')
         on conflict do nothing"
    } else {
        "delete from credential_members where credential_id = $1::text::uuid and user_id = 'bob'"
    };
    client.execute(sql, &[&state.world.shared]).await?;
    let after = outbox_position(&client).await?;
    tracing::info!(shared = request.shared, after, "demo: sharing changed");
    Ok(Json(json!({"shared": request.shared, "after": after})))
}

#[derive(Deserialize)]
struct TransferRequest {
    to: String,
}

/// Gives Alice's retirement credential to another user (the other one's memberships of it
/// go too).
async fn transfer(
    State(state): Shared,
    Json(request): Json<TransferRequest>,
) -> Result<Json<Value>, DemoError> {
    if !USERS.iter().any(|(id, _)| *id == request.to) {
        return Err(DemoError(StatusCode::NOT_FOUND, "no such demo user".into()));
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "update credentials set owner_id = $2 where id = $1::text::uuid",
        &[&state.world.transferable, &request.to],
    )
    .await?;
    tx.execute(
        "delete from credential_members where credential_id = $1::text::uuid and user_id = $2",
        &[&state.world.transferable, &request.to],
    )
    .await?;
    tx.commit().await?;
    let after = outbox_position(&client).await?;
    tracing::info!(to = %request.to, after, "demo: credential transferred");
    Ok(Json(json!({"owner": request.to, "after": after})))
}
