//! Model shapes away from the presets train through the hand-written CPU step: multi-query
//! and grouped-query attention, one head, head sizes that are not a multiple of the SIMD width,
//! windows of one token and of several causal blocks, tied embeddings. Each run's losses match
//! the composed candle reference (`WICK_ATTENTION=composed`) and do not depend on the thread
//! count; the explicit-backward tensor step (`WICK_GPU_STEP=tensor`, the GPU's opt-in path)
//! matches the reference too.
mod common;
use common::*;

const RECIPE: &str = r#"
local a = {}
for i, v in ipairs(wick.args) do a[i] = tonumber(v) or v end
local model = wick.model{ dim = a[1], n_layers = a[2], n_heads = a[3], n_kv_heads = a[4],
  seq_len = a[5], hidden_dim = a[7], tie_embeddings = a[8] == "tie" }
local session = wick.session{ model = model, optim = wick.optim.adamw{ lr = 3e-3 } }
local train = wick.data.loader{ source = wick.data.jsonl{ "c.jsonl" }, batch = a[6], seq_len = a[5] }
for step in session:steps(4) do
  print(("loss %.9e"):format(session:step(train:next())))
end
print(("eval %.9e"):format(session:eval(train, 1)))
"#;

/// Which step trains: the hand-written CPU step, candle's composed autograd, or the tensor
/// step with its explicit backward.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    Cpu,
    Composed,
    Tensor,
}

fn losses(d: &Dir, args: &[&str], threads: &str, path: Path) -> Vec<f64> {
    let mut extra = vec!["--"];
    extra.extend_from_slice(args);
    let mut cmd = d.run_cmd("shape.lua", &extra);
    cmd.env("RAYON_NUM_THREADS", threads);
    if path != Path::Cpu {
        cmd.env("WICK_ATTENTION", "composed");
    }
    if path == Path::Tensor {
        cmd.env("WICK_GPU_STEP", "tensor");
    }
    let o = cmd.output().unwrap();
    assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
    let values: Vec<f64> = stdout(&o)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| *k == "loss" || *k == "eval")
        .map(|(_, v)| v.parse().unwrap())
        .collect();
    assert_eq!(values.len(), 5, "{args:?}: {}", stdout(&o));
    values
}

#[test]
fn odd_shapes_match_the_reference_and_any_thread_count() {
    let d = Dir::new();
    d.write("shape.lua", RECIPE);
    d.corpus("c.jsonl", 60);
    // dim, layers, heads, kv heads, seq_len, batch, hidden, tie
    let shapes: [[&str; 8]; 5] = [
        ["12", "1", "3", "1", "1", "3", "20", "untied"], // MQA, one-token windows
        ["16", "2", "1", "1", "130", "1", "32", "tie"],  // one head, three causal blocks
        ["24", "1", "6", "2", "65", "2", "40", "untied"], // GQA (3 query heads per kv head)
        ["40", "1", "2", "2", "33", "2", "64", "tie"],   // head size 20
        ["64", "1", "4", "4", "70", "3", "192", "untied"], // products split into row bands
    ];
    for s in &shapes {
        let fast = losses(&d, s, "2", Path::Cpu);
        let one_thread = losses(&d, s, "1", Path::Cpu);
        assert_eq!(fast, one_thread, "{s:?}: losses depend on the thread count");
        let reference = losses(&d, s, "1", Path::Composed);
        let tensor = losses(&d, s, "2", Path::Tensor);
        for ((a, b), t) in fast.iter().zip(&reference).zip(&tensor) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "{s:?}: hand-written step {fast:?} vs composed reference {reference:?}"
            );
            assert!(
                (t - b).abs() <= 1e-4 * b.abs(),
                "{s:?}: tensor step {tensor:?} vs composed reference {reference:?}"
            );
        }
        assert!(
            fast.iter().all(|l| l.is_finite() && *l > 0.0),
            "{s:?}: {fast:?}"
        );
    }
}
