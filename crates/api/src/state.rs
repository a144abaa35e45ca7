use callboard_store::LiveQuery;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub live: LiveQuery,
}
