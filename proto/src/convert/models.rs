//! Registered models between the wire and [`nexa_shared::models`].

use super::{ConvertError, err};
use crate::v1;
use nexa_shared::models::{Model, Promotion, RegistryAnswer, Tag, Version};

impl From<&Version> for v1::ModelVersion {
    fn from(v: &Version) -> Self {
        Self {
            name: v.name.clone(),
            version: v.version.clone(),
            uri: v.uri.clone(),
            hash: v.hash.clone(),
            meta_json: v.meta.to_string(),
            registered_at: v.registered_at.clone(),
            deleted_at: v.deleted_at.clone(),
        }
    }
}

impl TryFrom<v1::ModelVersion> for Version {
    type Error = ConvertError;
    fn try_from(v: v1::ModelVersion) -> Result<Self, ConvertError> {
        let meta = if v.meta_json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&v.meta_json)
                .map_err(|e| err("ModelVersion", "meta_json", e.to_string()))?
        };
        Ok(Self {
            name: v.name,
            version: v.version,
            uri: v.uri,
            hash: v.hash,
            meta,
            registered_at: v.registered_at,
            deleted_at: v.deleted_at,
        })
    }
}

impl From<&Promotion> for v1::Promotion {
    fn from(p: &Promotion) -> Self {
        Self {
            tag: p.tag.clone(),
            version: p.version.clone(),
            from: p.from.clone(),
            to: p.to.clone(),
        }
    }
}

impl From<v1::Promotion> for Promotion {
    fn from(p: v1::Promotion) -> Self {
        Self {
            tag: p.tag,
            version: p.version,
            from: p.from,
            to: p.to,
        }
    }
}

impl From<&Model> for v1::Model {
    fn from(m: &Model) -> Self {
        Self {
            name: m.name.clone(),
            versions: m
                .versions
                .iter()
                .map(|(k, v)| (k.clone(), v.into()))
                .collect(),
            tags: m
                .tags
                .iter()
                .map(|(k, t)| {
                    let tag = v1::ModelTag {
                        version: t.version.clone(),
                        since: t.since.clone(),
                    };
                    (k.clone(), tag)
                })
                .collect(),
            history: m.history.iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<v1::Model> for Model {
    type Error = ConvertError;
    fn try_from(m: v1::Model) -> Result<Self, ConvertError> {
        Ok(Self {
            name: m.name,
            versions: m
                .versions
                .into_iter()
                .map(|(k, v)| Ok((k, Version::try_from(v)?)))
                .collect::<Result<_, ConvertError>>()?,
            tags: m
                .tags
                .into_iter()
                .map(|(k, t)| {
                    let tag = Tag {
                        version: t.version,
                        since: t.since,
                    };
                    (k, tag)
                })
                .collect(),
            history: m.history.into_iter().map(Into::into).collect(),
        })
    }
}

impl From<&RegistryAnswer> for v1::ModelsResponse {
    fn from(a: &RegistryAnswer) -> Self {
        use v1::models_response::Answer;
        let answer = match a {
            RegistryAnswer::List(models) => Answer::List(v1::ModelList {
                models: models.iter().map(Into::into).collect(),
            }),
            RegistryAnswer::Model(m) => Answer::Model(m.into()),
            RegistryAnswer::Version(v) => Answer::Version(v.into()),
            RegistryAnswer::Promotion(p) => Answer::Promotion(p.into()),
        };
        Self {
            answer: Some(answer),
        }
    }
}

impl TryFrom<v1::ModelsResponse> for RegistryAnswer {
    type Error = ConvertError;
    fn try_from(r: v1::ModelsResponse) -> Result<Self, ConvertError> {
        use v1::models_response::Answer;
        Ok(match r.answer {
            Some(Answer::List(l)) => RegistryAnswer::List(
                l.models
                    .into_iter()
                    .map(Model::try_from)
                    .collect::<Result<_, _>>()?,
            ),
            Some(Answer::Model(m)) => RegistryAnswer::Model(m.try_into()?),
            Some(Answer::Version(v)) => RegistryAnswer::Version(v.try_into()?),
            Some(Answer::Promotion(p)) => RegistryAnswer::Promotion(p.into()),
            None => return Err(err("ModelsResponse", "answer", "missing")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn version(v: &str, meta: serde_json::Value, deleted: bool) -> Version {
        Version {
            name: "m".into(),
            version: v.into(),
            uri: format!("file:///p/models/m-{v}"),
            hash: (!deleted).then(|| format!("blake3:{v}")),
            meta,
            registered_at: "2026-12-01T00:00:00Z".into(),
            deleted_at: deleted.then(|| "2026-12-02T00:00:00Z".into()),
        }
    }

    #[test]
    fn every_registry_answer_survives_the_wire() {
        let model = Model {
            name: "m".into(),
            versions: BTreeMap::from([
                (
                    "0.1.0".into(),
                    version(
                        "0.1.0",
                        serde_json::json!({"acc": 0.9, "tags": ["a"]}),
                        true,
                    ),
                ),
                (
                    "0.2.0".into(),
                    version("0.2.0", serde_json::Value::Null, false),
                ),
            ]),
            tags: BTreeMap::from([(
                "prod".into(),
                Tag {
                    version: "0.2.0".into(),
                    since: "2026-12-01T01:00:00Z".into(),
                },
            )]),
            history: vec![
                Promotion {
                    tag: "prod".into(),
                    version: "0.1.0".into(),
                    from: "a".into(),
                    to: Some("b".into()),
                },
                Promotion {
                    tag: "prod".into(),
                    version: "0.2.0".into(),
                    from: "b".into(),
                    to: None,
                },
            ],
        };
        let answers = [
            RegistryAnswer::List(vec![model.clone(), Model::default()]),
            RegistryAnswer::List(Vec::new()),
            RegistryAnswer::Model(model.clone()),
            RegistryAnswer::Version(model.versions["0.1.0"].clone()),
            RegistryAnswer::Promotion(model.history[0].clone()),
        ];
        for a in answers {
            let wire = v1::ModelsResponse::from(&a);
            assert_eq!(RegistryAnswer::try_from(wire).expect("converts"), a);
        }
    }

    #[test]
    fn a_bad_answer_names_its_message_and_field() {
        let e = RegistryAnswer::try_from(v1::ModelsResponse { answer: None }).unwrap_err();
        assert_eq!((e.message, e.field), ("ModelsResponse", "answer"));
        let mut v = v1::ModelVersion::from(&version("1.0.0", serde_json::Value::Null, false));
        v.meta_json = "{not json".into();
        let e = Version::try_from(v).unwrap_err();
        assert_eq!((e.message, e.field), ("ModelVersion", "meta_json"));
    }
}
