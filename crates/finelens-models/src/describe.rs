//! A model's description of itself: what the analyses need to know about a network's shape
//! without naming any architecture's layers — its stages in network order (randomised together
//! by the sanity checks, reported together by weight drift), its representation layers (compared
//! by CKA), its embedding (explained when two models' heads differ), its head, its input kind.

use serde::{Deserialize, Serialize};

/// What a model reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// N × channels × H × W normalised images.
    Image { channels: usize },
    /// N × tokens ids (text models).
    TokenIds,
}

/// A group of parameters analyses treat as one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    /// Parameter-name prefixes (with their trailing `.`) that belong to the stage.
    pub prefixes: Vec<String>,
    /// The blocks inside it, as parameter-name prefixes without the trailing `.`
    /// (`layer3.0`); a stage without inner blocks lists none.
    pub blocks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDescription {
    pub input: InputKind,
    /// From the input to the head, in network order; the head is the last stage.
    pub stages: Vec<Stage>,
    /// Activations whose similarity between two models says how far representations moved.
    pub representation_layers: Vec<String>,
    /// The penultimate representation: the head's input.
    pub embedding_layer: String,
    /// Parameter-name prefixes of the head (what fine-tuning replaces).
    pub head_prefixes: Vec<String>,
    /// The last activation with spatial extent (Grad-CAM's default layer).
    pub last_spatial_layer: Option<String>,
}

impl ModelDescription {
    fn matches(prefix: &str, name: &str) -> bool {
        name.starts_with(prefix) || prefix.strip_suffix('.') == Some(name)
    }

    /// The stage a parameter belongs to.
    pub fn stage_of(&self, name: &str) -> Option<&str> {
        self.stages
            .iter()
            .find(|s| s.prefixes.iter().any(|p| Self::matches(p, name)))
            .map(|s| s.name.as_str())
    }

    /// The block a parameter belongs to: the longest block prefix that holds it, else its
    /// stage.
    pub fn block_of(&self, name: &str) -> Option<String> {
        self.stages
            .iter()
            .flat_map(|s| s.blocks.iter())
            .filter(|b| name.starts_with(&format!("{b}.")))
            .max_by_key(|b| b.len())
            .cloned()
            .or_else(|| self.stage_of(name).map(str::to_owned))
    }

    pub fn is_head(&self, name: &str) -> bool {
        self.head_prefixes.iter().any(|p| Self::matches(p, name))
    }

    /// The stages from the head down to the input: the order of cascading randomisation.
    pub fn stages_from_head(&self) -> impl Iterator<Item = &Stage> {
        self.stages.iter().rev()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_map_to_blocks_stages_and_the_head() {
        let d = ModelDescription {
            input: InputKind::Image { channels: 3 },
            stages: vec![
                Stage {
                    name: "stem".into(),
                    prefixes: vec!["conv1.".into(), "bn1.".into()],
                    blocks: vec![],
                },
                Stage {
                    name: "layer1".into(),
                    prefixes: vec!["layer1.".into()],
                    blocks: vec!["layer1.0".into(), "layer1.1".into()],
                },
                Stage {
                    name: "fc".into(),
                    prefixes: vec!["fc.".into()],
                    blocks: vec![],
                },
            ],
            representation_layers: vec!["layer1".into()],
            embedding_layer: "avgpool".into(),
            head_prefixes: vec!["fc.".into()],
            last_spatial_layer: Some("layer1".into()),
        };
        assert_eq!(d.stage_of("bn1.running_var"), Some("stem"));
        assert_eq!(
            d.block_of("layer1.1.conv2.weight").as_deref(),
            Some("layer1.1")
        );
        assert_eq!(d.block_of("conv1.weight").as_deref(), Some("stem"));
        assert_eq!(d.stage_of("layer10.0.conv1.weight"), None);
        assert!(d.is_head("fc.bias") && !d.is_head("fc0.weight"));
        let names: Vec<&str> = d.stages_from_head().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["fc", "layer1", "stem"]);
    }
}
