//! A naive Qwen2 forward in f64 over plain vectors, written from the
//! architecture's definition (RMS norm, Q/K/V with biases, rotate-half RoPE
//! at float positions, grouped-query causal attention, SwiGLU): an
//! independent reference for what the library's forward computes per
//! layer (K, V, attention probabilities), which candle-transformers does
//! not expose.

use std::collections::HashMap;

use candle_core::Tensor;
use cram::Qwen2Config;

/// Row-major (rows, columns) f64 matrix.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    fn from_tensor(tensor: &Tensor) -> Self {
        let (rows, cols) = match tensor.dims() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            other => panic!("not a matrix: {other:?}"),
        };
        let data = tensor.to_dtype(candle_core::DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        Self { rows, cols, data }
    }

    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// What the reference computes for a sequence run from scratch.
#[derive(Debug, Clone)]
pub struct Output {
    /// [layer][kv_head][token][dim], RoPE applied.
    pub keys: Vec<Vec<Vec<Vec<f64>>>>,
    /// [layer][kv_head][token][dim]
    pub values: Vec<Vec<Vec<Vec<f64>>>>,
    /// [layer][head][query][key]: causal, zero above the diagonal.
    pub probabilities: Vec<Vec<Vec<Vec<f64>>>>,
    /// [token][vocab]
    pub logits: Vec<Vec<f64>>,
}

/// The weights, by HF name, as f64 matrices.
pub struct Reference {
    config: Qwen2Config,
    weights: HashMap<String, Matrix>,
}

impl Reference {
    pub fn new(config: &Qwen2Config, weights: &HashMap<String, Tensor>) -> Self {
        let weights = weights.iter().map(|(name, t)| (name.clone(), Matrix::from_tensor(t))).collect();
        Self { config: config.clone(), weights }
    }

    fn w(&self, name: &str) -> &Matrix {
        &self.weights[name]
    }

    /// `x W^T (+ b)` for every row of `x`.
    fn linear(&self, x: &[Vec<f64>], weight: &str, bias: Option<&str>) -> Vec<Vec<f64>> {
        let w = self.w(weight);
        x.iter()
            .map(|row| {
                (0..w.rows)
                    .map(|o| {
                        let dot: f64 = w.row(o).iter().zip(row).map(|(a, b)| a * b).sum();
                        dot + bias.map_or(0.0, |b| self.w(b).data[o])
                    })
                    .collect()
            })
            .collect()
    }

    fn rms_norm(&self, x: &[Vec<f64>], gain: &str) -> Vec<Vec<f64>> {
        let g = &self.w(gain).data;
        x.iter()
            .map(|row| {
                let mean_square = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
                let scale = 1.0 / (mean_square + self.config.rms_norm_eps).sqrt();
                row.iter().zip(g).map(|(v, g)| v * scale * g).collect()
            })
            .collect()
    }

    /// Rotate-half RoPE of one head vector at `position`.
    pub fn rope(&self, x: &[f64], position: f64) -> Vec<f64> {
        let d = x.len();
        let half = d / 2;
        let mut out = vec![0.0; d];
        for i in 0..half {
            let angle = position * self.config.rope_theta.powf(-((2 * i) as f64) / d as f64);
            let (sin, cos) = angle.sin_cos();
            out[i] = x[i] * cos - x[i + half] * sin;
            out[i + half] = x[i + half] * cos + x[i] * sin;
        }
        out
    }

    /// Runs `ids` at `positions` from scratch (no cache).
    pub fn forward(&self, ids: &[u32], positions: &[f32]) -> Output {
        let embed = self.w("model.embed_tokens.weight");
        let hidden: Vec<Vec<f64>> = ids.iter().map(|&id| embed.row(id as usize).to_vec()).collect();
        self.forward_embeddings(hidden, positions)
    }

    /// Runs input embeddings [token][hidden] at `positions` from scratch.
    pub fn forward_embeddings(&self, mut x: Vec<Vec<f64>>, positions: &[f32]) -> Output {
        let c = &self.config;
        let (n, d) = (x.len(), c.head_dim());
        let groups = c.num_attention_heads / c.num_key_value_heads;
        let mut out = Output { keys: vec![], values: vec![], probabilities: vec![], logits: vec![] };
        for layer in 0..c.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let normed = self.rms_norm(&x, &format!("{p}.input_layernorm.weight"));
            let project = |name: &str| self.linear(&normed, &format!("{p}.self_attn.{name}.weight"), Some(&format!("{p}.self_attn.{name}.bias")));
            let (q, k, v) = (project("q_proj"), project("k_proj"), project("v_proj"));
            let head = |m: &[Vec<f64>], h: usize, t: usize| m[t][h * d..(h + 1) * d].to_vec();
            let keys: Vec<Vec<Vec<f64>>> =
                (0..c.num_key_value_heads).map(|h| (0..n).map(|t| self.rope(&head(&k, h, t), positions[t] as f64)).collect()).collect();
            let values: Vec<Vec<Vec<f64>>> = (0..c.num_key_value_heads).map(|h| (0..n).map(|t| head(&v, h, t)).collect()).collect();
            let mut probabilities = Vec::new();
            let mut attended = vec![vec![0.0; c.hidden_size]; n];
            for h in 0..c.num_attention_heads {
                let kv = h / groups;
                let mut rows = Vec::new();
                for i in 0..n {
                    let query = self.rope(&head(&q, h, i), positions[i] as f64);
                    let scores: Vec<f64> =
                        (0..=i).map(|j| query.iter().zip(&keys[kv][j]).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()).collect();
                    let max = scores.iter().copied().fold(f64::MIN, f64::max);
                    let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    let mut row: Vec<f64> = scores.iter().map(|s| (s - max).exp() / total).collect();
                    for (j, weight) in row.iter().enumerate() {
                        for e in 0..d {
                            attended[i][h * d + e] += weight * values[kv][j][e];
                        }
                    }
                    row.resize(n, 0.0);
                    rows.push(row);
                }
                probabilities.push(rows);
            }
            let attention = self.linear(&attended, &format!("{p}.self_attn.o_proj.weight"), None);
            x = x.iter().zip(&attention).map(|(a, b)| a.iter().zip(b).map(|(a, b)| a + b).collect()).collect();
            let normed = self.rms_norm(&x, &format!("{p}.post_attention_layernorm.weight"));
            let gate = self.linear(&normed, &format!("{p}.mlp.gate_proj.weight"), None);
            let up = self.linear(&normed, &format!("{p}.mlp.up_proj.weight"), None);
            let swiglu: Vec<Vec<f64>> =
                gate.iter().zip(&up).map(|(g, u)| g.iter().zip(u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect()).collect();
            let mlp = self.linear(&swiglu, &format!("{p}.mlp.down_proj.weight"), None);
            x = x.iter().zip(&mlp).map(|(a, b)| a.iter().zip(b).map(|(a, b)| a + b).collect()).collect();
            out.keys.push(keys);
            out.values.push(values);
            out.probabilities.push(probabilities);
        }
        let normed = self.rms_norm(&x, "model.norm.weight");
        let head = if self.weights.contains_key("lm_head.weight") { "lm_head.weight" } else { "model.embed_tokens.weight" };
        out.logits = self.linear(&normed, head, None);
        out
    }
}

/// Per layer (1, heads, n, dim) tensor as [head][token][dim] f64.
pub fn heads_of(tensor: &Tensor) -> Vec<Vec<Vec<f64>>> {
    tensor.to_dtype(candle_core::DType::F64).unwrap().squeeze(0).unwrap().to_vec3::<f64>().unwrap()
}

/// Largest absolute difference between [a][b][c] arrays, `b` of `ours`
/// narrowed to `from..` of the reference's (its last tokens).
pub fn max_diff_3(ours: &[Vec<Vec<f64>>], reference: &[Vec<Vec<f64>>], from: usize) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let mut worst = 0.0f64;
    for (a, b) in ours.iter().zip(reference) {
        assert_eq!(a.len() + from, b.len(), "token counts");
        for (x, y) in a.iter().zip(&b[from..]) {
            assert_eq!(x.len(), y.len());
            for (x, y) in x.iter().zip(y) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    worst
}
