//! The OpenAPI document, generated from the handlers' annotations.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, api, error, hf, kserve, observe};

#[derive(OpenApi)]
#[openapi(
    info(title = "prefixd", description = "Prefix-tuned BERT text classification: many tasks over one frozen model."),
    paths(
        api::classify,
        api::list_tasks,
        api::get_task,
        admin::put_task,
        admin::delete_task,
        api::health,
        api::ready,
        api::metrics,
        observe::info,
        hf::predict,
        kserve::server_metadata,
        kserve::list_models,
        kserve::model_metadata,
        kserve::model_ready,
        kserve::infer,
    ),
    components(schemas(
        api::ClassifyRequest,
        api::TextPair,
        admin::PrefixFileBody,
        admin::PeftUpload,
        api::ClassifyResponse,
        api::ClassifyResult,
        api::TaskInfo,
        api::TaskList,
        api::Status,
        error::ErrorBody,
        observe::ServerInfo,
        observe::ModelDescription,
        observe::LimitsDescription,
        hf::PredictRequest,
        hf::PredictParameters,
        hf::LabelScore,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        // Two schemes, one header: the admin token, and the optional API keys (`--api-key`).
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The admin token (--admin-token)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (--api-key); required only when the server has one",
                    ))
                    .build(),
            ),
        );
    }
}
