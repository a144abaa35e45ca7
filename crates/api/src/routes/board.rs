use actix_web::http::header;
use actix_web::HttpResponse;

/// The page: HTML, CSS and JS in one file, embedded in the binary.
const PAGE: &str = include_str!("../board.html");

/// `GET /board`: a live Kanban of the caller's tenant. The page asks for
/// nothing itself; its script opens the stream with the token from
/// `access_token` (moved out of the logged URI) or a paste box.
#[utoipa::path(get, path = "/board", tag = "calls",
    description = "A live Kanban page of the tenant whose token is given in `access_token` or pasted in.",
    responses((status = 200, description = "The page", content_type = "text/html", body = String)))]
pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ))
        .body(PAGE)
}
