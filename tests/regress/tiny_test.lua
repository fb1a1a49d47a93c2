-- wick's own regression suite: `wick test` (run from the repository root).
-- Cases run in fresh processes with a fixed seed; data is the shipped sample.

local function setup(opts)
  opts = opts or {}
  local model = wick.model{ dim = 32, n_layers = 2, n_heads = 4, seq_len = 64, seed = opts.seed }
  local session = wick.session{ model = model, optim = wick.optim.adamw{ lr = 3e-3 }, resume = opts.resume }
  local train = wick.data.loader{
    source = wick.data.jsonl{ "data/sample/train" }, batch = 4, seq_len = 64,
    name = opts.name or "train", resume = opts.resume,
  }
  return model, session, train
end

local function losses(session, train, n)
  local out = {}
  for i = 1, n do out[i] = session:step(train:next()) end
  return out
end

test("tiny model loss curve matches the golden file", function()
  local _, session, train = setup()
  local l = losses(session, train, 12)
  expect(l[1]):near(math.log(257), 0.15)      -- starts at chance
  expect(l):decreasing{ window = 4 }
  expect.golden("tiny_loss_curve", l, { rtol = 1e-3 })
end)

test("same seed, same data: bit-identical losses", function()
  local _, s1, t1 = setup{ name = "a" }
  local a = losses(s1, t1, 5)
  local _, s2, t2 = setup{ name = "b" }
  local b = losses(s2, t2, 5)
  for i = 1, 5 do expect(b[i]):to_be(a[i]) end
  local _, s3, t3 = setup{ name = "c", seed = 99 }
  expect(losses(s3, t3, 1)[1] ~= a[1]):to_be(true)
end)

test("save then resume gives the straight run's losses", function()
  local _, straight, t0 = setup{ name = "train" }
  local want = losses(straight, t0, 6)
  local _, s, t = setup{ name = "train" }
  losses(s, t, 3)
  local path = wick.save(wick.ckpt_dir .. "/mid.ckpt")
  local _, resumed, t2 = setup{ name = "train", resume = path }
  expect(resumed.global_step):to_be(3)
  local got = losses(resumed, t2, 3)
  for i = 1, 3 do expect(got[i]):to_be(want[i + 3]) end
end)

test("generation is reproducible for a seed", function()
  local model, session, train = setup()
  losses(session, train, 3)
  local a = model:generate("ROMEO:", { max_tokens = 40, seed = 7 })
  local b = model:generate("ROMEO:", { max_tokens = 40, seed = 7 })
  local c = model:generate("ROMEO:", { max_tokens = 40, seed = 8 })
  expect(a):to_be(b)
  expect(a ~= c):to_be(true)
end)
