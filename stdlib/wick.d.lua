---@meta
-- LuaLS annotations for wick's Lua API (point your editor's Lua language server at stdlib/).
-- The REPL's :help reads its text from this file too.

---@class wick
---@field args string[] Arguments after `--` on the command line (also Lua's `arg`).
---@field seed integer The run's seed (`--seed`).
---@field resumed boolean True when the run continues a checkpoint (`--resume`).
---@field device string The compute device (`cpu`, `cuda:0`, ...; `--device`).
---@field dtype string The compute dtype (`f32` or `bf16`; `--dtype`). Weights stay f32.
---@field rank integer Data-parallel: this process's rank (0 alone; rank 0 prints, logs and saves).
---@field world_size integer Data-parallel: the number of ranks (1 alone). `loader:next()` hands each rank its rows of the global batch.
---@field version string wick's version.
---@field state table Your own plain data, saved in the checkpoint and restored on resume.
---@field optim wick.optim
---@field data wick.data
---@field tokenizer wick.tokenizers
wick = {}

---@class wick.ModelOptions
---@field preset? "tiny"|"small"|"260k"|"15m" Named shape to start from (default tiny).
---@field dim? integer Model width.
---@field n_layers? integer Transformer blocks.
---@field n_heads? integer Attention heads.
---@field n_kv_heads? integer Key/value heads (grouped-query attention); defaults to n_heads.
---@field hidden_dim? integer SwiGLU width; defaults to llama2.c's rule for dim.
---@field vocab? integer Vocabulary size; must match the tokenizer (default: the tokenizer's).
---@field seq_len? integer Longest context.
---@field tie_embeddings? boolean Share the input embedding with the output head.
---@field tokenizer? wick.Tokenizer Tokenizer (default byte-level, 257 tokens).
---@field seed? integer Initialisation seed (default: the run's seed).
---@field norm_eps? number RMSNorm epsilon (1e-5).
---@field rope_theta? number Rotary base (10000).

--- Build a llama-style decoder (RMSNorm, rotary, grouped-query attention, SwiGLU), seeded init.
---@param opts wick.ModelOptions
---@return wick.Model
function wick.model(opts) end

--- A model with the weights of a checkpoint file (config from its metadata).
---@param path string
---@param opts? {tokenizer?: wick.Tokenizer}
---@return wick.Model
function wick.load(path, opts) end

---@class wick.Model
---@field config table The model's shape (dim, n_layers, ...).
---@field params integer Parameter count.
---@field vocab integer
---@field seq_len integer
local Model = {}

--- Sample a continuation of `prompt`.
---@param prompt string
---@param opts? {max_tokens?: integer, temperature?: number, top_k?: integer, seed?: integer}
---@return string
function Model:generate(prompt, opts) end

--- Logits for each position of a string or a list of token ids.
---@param input string|integer[]
---@return number[][]
function Model:logits(input) end

---@return integer
function Model:param_count() end

--- Names of the model's weights.
---@return string[]
function Model:weights() end

--- One weight, for inspection: shape, dtype, values, mean, norm.
---@param name string e.g. "layers.0.attention.wq.weight"
---@return wick.Tensor
function Model:weight(name) end

---@class wick.Tensor
---@field shape integer[]
---@field dtype string
---@field numel integer
local Tensor = {}
--- The first n values (all by default), flattened.
---@param n? integer
---@return number[]
function Tensor:values(n) end
---@return number
function Tensor:mean() end
---@return number
function Tensor:norm() end

---@class wick.optim
wick.optim = {}

--- AdamW with decoupled weight decay (not on norms or embeddings) and global-norm clipping.
---@param opts? {lr?: number, betas?: number[], beta1?: number, beta2?: number, eps?: number, weight_decay?: number, clip?: number}
---@return wick.Optim
function wick.optim.adamw(opts) end

---@class wick.Optim

--- A training session: model + optimizer + step counter. The host checkpoints the last one made.
---@param opts {model: wick.Model, optim?: wick.Optim, lr?: number}
---@return wick.Session
function wick.session(opts) end

---@class wick.Session
---@field lr number Learning rate of the next step (settable).
---@field global_step integer Steps trained over the whole run, resumes included.
---@field last_loss number|nil Loss of the last step.
---@field tokens_seen integer Training tokens consumed.
---@field grad_norm number|nil Gradient norm of the last step (before clipping).
---@field model wick.Model
local Session = {}

--- One indivisible optimizer step: forward, cross-entropy, backward, clip, update. Returns the loss.
---@param batch wick.Batch
---@return number
function Session:step(batch) end

--- Mean loss over the loader's first `n` batches (the same every time), no graph built.
---@param loader wick.Loader
---@param n? integer default 8
---@return number
function Session:eval(loader, n) end

--- Iterator over the steps still to run up to `total` (continues after the checkpoint's step).
---@param total integer
---@return fun(): integer
function Session:steps(total) end

---@class wick.data
wick.data = {}

---@class wick.SourceOptions
---@field [integer] string Files or directories.
---@field field? string JSON field with the text (default "text").
---@field shuffle? boolean Shuffle file order each epoch (seeded).
---@field seed? integer
---@field on_bad_row? "skip"|"error" Malformed rows: skipped and counted (default) or an error.
---@field on_bad_file? "skip"|"error" Unreadable or corrupt files: an error (default) or skipped.
---@field subsets? string[] Keep only these `meta.redpajama_set_name` subsets.
---@field name? string
---@field filter? (fun(doc: wick.Doc): boolean)|string Keep a document when true; runs on the data thread in its own Lua state: a function using only globals, or "module.function" (found next to the recipe).
---@field map? (fun(doc: wick.Doc): string|nil)|string The document's new text (nil drops it); same rules as `filter`.

---@class wick.Doc
---@field text string
---@field subset string SlimPajama subset (`unknown` when none).
---@field meta table|nil The row's `meta`.
---@field source string "file:line".

--- `.jsonl` files, plain or compressed (`.jsonl.zst`, `.jsonl.gz`); directories are searched
--- recursively, sorted naturally (other compressions are skipped there with a warning).
---@param opts wick.SourceOptions|string
---@return wick.Source
function wick.data.jsonl(opts) end

--- Plain text files (each file is one document).
---@param opts wick.SourceOptions|string
---@return wick.Source
function wick.data.text(opts) end

--- Any data files, format by extension.
---@param opts wick.SourceOptions|string
---@return wick.Source
function wick.data.files(opts) end

--- SlimPajama layout: {root}/{split}/chunk{N}/example_{train|holdout}_{i}.jsonl.zst.
--- With `mix`, one stream per subset mixed by weight (0 drops a subset).
---@param opts {root?: string, split?: "train"|"validation"|"test", chunks?: integer[], subsets?: string[], mix?: table<string, number>, shuffle?: boolean, seed?: integer, on_bad_row?: string, on_bad_file?: string, filter?: function|string, map?: function|string}
---@return wick.Source|wick.Mix
function wick.data.slimpajama(opts) end

--- A batch from Lua values: rows of seq_len + 1 token ids (all the same length), for
--- session:step and synthetic tasks. Ids must be inside the model's vocabulary.
---@param rows integer[][]
---@return wick.Batch
function wick.data.batch(rows) end

--- A source written in Lua. `next()` returns a document's text or a list of token ids, nil at
--- the end of an epoch. It runs on the training thread when its loader is asked for a batch.
--- `state()` (plain data) and `restore(s)` make exact resume (and evaluation) possible;
--- without them, --resume is refused.
---@param opts {next: fun(): string|integer[]|nil, state?: fun(): any, restore?: fun(s: any), name?: string}
---@return wick.Source
function wick.data.lua(opts) end

--- A weighted mixture of sources, sampled per sequence from a seeded RNG.
---@param parts {source: wick.Source, weight: number}[]
---@return wick.Mix
function wick.data.mix(parts) end

--- Packs (batch, seq_len+1) token windows on a background thread.
---@param opts {source: wick.Source|wick.Mix, batch?: integer, seq_len?: integer, tokenizer?: wick.Tokenizer, name?: string, prefetch?: integer, seed?: integer}
---@return wick.Loader
function wick.data.loader(opts) end

---@class wick.Source
---@field files string[]
---@field name string

---@class wick.Mix

---@class wick.Loader
---@field name string
---@field batch integer
---@field seq_len integer
---@field rows integer Rows read so far.
---@field bad_rows integer Rows skipped as bad.
---@field filtered integer Documents a Lua filter or map dropped.
local Loader = {}

--- The next batch (data-parallel: this rank's rows of it).
---@return wick.Batch
function Loader:next() end

--- Change batch, seq_len or mixture weights from the next batch on (phases).
---@param opts {batch?: integer, seq_len?: integer, mix?: table<string, number>}
function Loader:set(opts) end

---@class wick.Batch
---@field size integer Rows (data-parallel: this rank's share of the global batch).
---@field seq_len integer
local Batch = {}

--- Token ids of one row (1-based).
---@param row? integer
---@return integer[]
function Batch:tokens(row) end

---@class wick.tokenizers
wick.tokenizer = {}

--- Byte-level tokenizer: 256 bytes + end-of-document (257 tokens).
---@return wick.Tokenizer
function wick.tokenizer.bytes() end

--- A Hugging Face tokenizer.json.
---@param path string
---@return wick.Tokenizer
function wick.tokenizer.load(path) end

---@class wick.Tokenizer
---@field vocab integer
---@field eod integer End-of-document token id.
local Tokenizer = {}
---@param text string
---@return integer[]
function Tokenizer:encode(text) end
---@param ids integer[]
---@return string
function Tokenizer:decode(ids) end

--- Write a row to <ckpt-dir>/metrics.jsonl (with step, lr, loss) and a line on stderr.
---@param fields table<string, any>
function wick.log(fields) end

--- Save a checkpoint now (reason "manual"); with a path, to that file. Returns the path.
---@param path? string
---@return string|nil
function wick.save(path) end

--- True once a stop (Ctrl+C, SIGTERM) was requested.
---@return boolean
function wick.stopping() end
