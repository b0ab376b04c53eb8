import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { test } from "node:test";

const SRC = new URL("../src/", import.meta.url);

// What Deno (a Supabase Edge Function) lacks or spells differently. tsconfig.json
// already compiles src/ without Node's types; this catches the rest.
const NODE_ONLY = [/\bprocess\./, /\bBuffer\b/, /\brequire\(/, /from "node:/, /__dirname/, /__filename/, /\bglobal\./];

test("the publisher uses web-standard APIs only, with Deno-style imports", () => {
  const files = readdirSync(SRC).filter((name) => name.endsWith(".ts"));
  assert.ok(files.length >= 4);
  for (const name of files) {
    const text = readFileSync(new URL(name, SRC), "utf8");
    const code = text.replace(/^\s*\/\/.*$/gm, "");
    for (const pattern of NODE_ONLY) assert.ok(!pattern.test(code), `${name} uses ${pattern}`);
    for (const [, spec] of code.matchAll(/from "([^"]+)"/g)) {
      assert.ok(spec.startsWith("./") && spec.endsWith(".ts"), `${name} imports ${spec}: relative .ts only`);
    }
  }
});
