// The official openai npm SDK against local models served by the Python model
// worker through the gateway (node's built-in test runner:
// `node --test local.test.mjs`). tests/integration/test_local_models.py
// starts the gateway with AIGW_LOCAL_MODELS=1 and a model worker serving the
// tiny model and the hashing embedder, and sets:
//
//   AIGW_BASE_URL     e.g. http://127.0.0.1:8080/v1   (required)
//   AIGW_API_KEY      a key the gateway accepts        (required)
//
// The tiny model has random weights: its text is noise, so the tests check
// the shape, the streaming and the usage, not the words.

import { test } from "node:test";
import assert from "node:assert/strict";
import OpenAI from "openai";

const baseURL = process.env.AIGW_BASE_URL;
const apiKey = process.env.AIGW_API_KEY;
if (!baseURL || !apiKey) {
  throw new Error("set AIGW_BASE_URL and AIGW_API_KEY (see tests/integration/test_local_models.py)");
}

// No retries: a retried request would hide a gateway error.
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20_000 });
// The /local routes: the same API with bare local model names.
const local = new OpenAI({
  baseURL: baseURL.replace(/\/v1\/?$/, "/local"), apiKey, maxRetries: 0, timeout: 20_000,
});
const messages = [{ role: "user", content: "hello there world" }];

test("models.list shows the local models", async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.ok(ids.includes("local/tiny"), `models: ${ids}`);
  assert.ok(ids.includes("local/hash-embed"), `models: ${ids}`);
  const bare = [];
  for await (const m of local.models.list()) {
    assert.equal(m.owned_by, "local");
    bare.push(m.id);
  }
  assert.ok(bare.includes("tiny") && !bare.includes("local/tiny"), `local models: ${bare}`);
});

test("chat.completions.create streams from local/tiny", async () => {
  const stream = await client.chat.completions.create({
    model: "local/tiny", messages, stream: true, max_tokens: 12, temperature: 0, seed: 7,
    stream_options: { include_usage: true },
  });
  let text = "";
  let deltas = 0;
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    assert.equal(chunk.object, "chat.completion.chunk");
    assert.equal(chunk.model, "local/tiny");
    for (const choice of chunk.choices) {
      if (choice.delta?.content) deltas += 1;
      text += choice.delta?.content ?? "";
      finish = choice.finish_reason ?? finish;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  assert.ok(deltas >= 2, `only ${deltas} content deltas`);
  assert.ok(text.length > 0);
  assert.equal(finish, "length");
  assert.ok(usage, "no usage chunk although include_usage was asked");
  assert.equal(usage.completion_tokens, 12);
  assert.equal(usage.total_tokens, usage.prompt_tokens + 12);
});

test("greedy local generation is the same streamed or not", async () => {
  const body = { model: "tiny", messages, max_tokens: 10, temperature: 0 };
  const whole = await local.chat.completions.create(body);
  assert.equal(whole.object, "chat.completion");
  assert.equal(whole.model, "tiny");
  let text = "";
  for await (const chunk of await local.chat.completions.create({ ...body, stream: true })) {
    text += chunk.choices[0]?.delta?.content ?? "";
  }
  assert.equal(text, whole.choices[0].message.content);
});

test("embeddings.create from local/hash-embed (base64, decoded by the SDK)", async () => {
  const result = await client.embeddings.create({
    model: "local/hash-embed", input: ["first text", "second text"], dimensions: 64,
  });
  assert.equal(result.object, "list");
  assert.equal(result.data.length, 2);
  for (const item of result.data) {
    assert.equal(item.embedding.length, 64);
    const norm = Math.sqrt(item.embedding.reduce((s, x) => s + x * x, 0));
    assert.ok(Math.abs(norm - 1) < 1e-4, `norm ${norm}`);
  }
  assert.notDeepEqual(result.data[0].embedding, result.data[1].embedding);
  assert.ok(result.usage.prompt_tokens > 0);
});

test("an unknown local model is a NotFoundError", async () => {
  await assert.rejects(
    client.chat.completions.create({ model: "local/no-such-model", messages }),
    (err) => {
      assert.ok(err instanceof OpenAI.NotFoundError, `${err.constructor.name}: ${err}`);
      assert.equal(err.code, "model_not_found");
      return true;
    });
});
