// The dashboard in Debian's headless Chromium, driven by playwright-core, against a provider
// node and a requester node on loopback (started by cli/tests/dashboard.rs, which passes the
// addresses and tokens in the environment). Checks, each through the page only:
//   - a wrong token is refused with a message and shows no data, and a deposit posted with it
//     from the page's origin is refused (401);
//   - the buyer signs in on the requester node, sees the provider on offer, buys an image and
//     sees it with its cost and receipt;
//   - the seller signs in on the provider node, sees the earning, records a deposit for the
//     buyer and sees the buyer's balance change; a refused deposit shows the API's reason.
// Screenshots of both views go to PIXMARKET_SCREENSHOT_DIR.
"use strict";

const { chromium } = require("playwright-core");
const fs = require("fs");
const os = require("os");
const path = require("path");

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(k + " is not set");
  return v;
};
const PROVIDER = env("PIXMARKET_PROVIDER_URL");
const PROVIDER_TOKEN = env("PIXMARKET_PROVIDER_TOKEN");
const REQUESTER = env("PIXMARKET_REQUESTER_URL");
const REQUESTER_TOKEN = env("PIXMARKET_REQUESTER_TOKEN");
const BUYER_PEER = env("PIXMARKET_BUYER_PEER");
const SHOTS = env("PIXMARKET_SCREENSHOT_DIR");
const CHROMIUM = process.env.PIXMARKET_CHROMIUM || "/usr/bin/chromium";
// Each wait for the page is bounded: a tiny-model image on a loaded 2-core machine takes
// seconds; a minute means something is wrong.
const WAIT_MS = 60000;

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
  console.log("ok: " + what);
}

async function signIn(page, url, token) {
  await page.goto(url + "/");
  await page.fill("#token", token);
  await page.click("#signin-button");
}

async function main() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "pixmarket-chromium-"));
  // A fresh profile (--user-data-dir) each run: nothing kept from an earlier one.
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  try {
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT_MS);
    const consoleErrors = [];
    page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
    page.on("pageerror", (e) => consoleErrors.push(String(e)));

    // --- a wrong token: refused, nothing shown, nothing written
    await signIn(page, PROVIDER, "0".repeat(64));
    await page.waitForSelector("#error:not([hidden])");
    const msg = await page.textContent("#error");
    check(msg.includes("did not accept this token") && msg.includes("api.token"), "a wrong token is refused with a message: " + msg.trim());
    check(await page.isHidden("#provider") && await page.isHidden("#buyer") && await page.isVisible("#signin"), "a wrong token shows no view");
    check((await page.evaluate(() => sessionStorage.length)) === 0, "a wrong token is not kept");
    const forged = await page.evaluate(async ([peer]) => {
      const r = await fetch("/api/v1/accounts/" + peer + "/deposits", {
        method: "POST",
        headers: { Authorization: "Bearer " + "0".repeat(64), "Content-Type": "application/json" },
        body: JSON.stringify({ tokens: "1000" }),
      });
      return r.status;
    }, [BUYER_PEER]);
    check(forged === 401, "a deposit with a wrong token from the page's origin is refused (" + forged + ")");

    // --- the buyer's view on the requester node
    await signIn(page, REQUESTER, REQUESTER_TOKEN);
    await page.waitForSelector("#buyer:not([hidden])");
    check(await page.isVisible("#buyer"), "signed in, a non-providing node opens on the buyer view");
    await page.waitForFunction(() => document.querySelectorAll("#b-providers tbody tr td:not(.empty)").length > 0);
    check(true, "the provider on offer is listed");
    await page.fill("#g-prompt", "a lighthouse at dusk");
    await page.fill("#g-negative", "blurry");
    await page.selectOption("#g-size", "64x64");
    await page.fill("#g-steps", "8");
    await page.fill("#g-seed", "42");
    await page.fill("#g-max-cost", "50");
    await page.click("#g-submit");
    await page.waitForSelector("#j-figure:not([hidden])");
    const cost = (await page.textContent("#j-cost")).trim();
    const receipt = (await page.textContent("#j-receipt")).trim();
    const size = await page.evaluate(() => {
      const i = document.getElementById("j-image");
      return [i.naturalWidth, i.naturalHeight, i.src.slice(0, 5)];
    });
    check(/^\d+\.\d{6} tok$/.test(cost) && cost !== "0.000000 tok", "the image came with its cost: " + cost);
    check(/^[0-9a-f]{64}$/.test(receipt), "and its receipt: " + receipt);
    check(size[0] === 64 && size[1] === 64 && size[2] === "blob:", "the image is shown, 64x64, fetched with the token");
    await page.waitForFunction(() => document.querySelectorAll("#b-gallery figure img").length > 0);
    check((await page.textContent("#b-gallery")).includes("seed 42"), "the last images list it with its parameters");
    await page.screenshot({ path: path.join(SHOTS, "dashboard-buyer.png"), fullPage: true });

    // --- a refused purchase shows the API's reason
    await page.fill("#g-steps", "100000");
    await page.click("#g-submit");
    await page.waitForSelector("#j-status.bad");
    const refused = await page.textContent("#j-status");
    check(refused.includes("steps"), "an out-of-range step count is refused in words: " + refused.trim());

    // --- the provider's view on the provider node
    await page.click("#sign-out");
    check(await page.isVisible("#signin") && (await page.evaluate(() => sessionStorage.length)) === 0, "signing out forgets the token");
    await signIn(page, PROVIDER, PROVIDER_TOKEN);
    await page.waitForSelector("#provider:not([hidden])");
    await page.waitForFunction(() => document.querySelectorAll("#p-receipts tbody tr td:not(.empty)").length > 0);
    const earned = (await page.textContent("#p-earned")).trim();
    check(earned !== "0.000000 tok" && earned !== "–", "the seller sees what it earned: " + earned);
    check((await page.locator("#p-chart svg rect.earned").count()) > 0, "the earnings chart has a bar");
    check((await page.textContent("#p-jobs")).includes("completed"), "jobs by outcome list the completed job");
    check((await page.textContent("#p-devices")).includes("serving"), "the device is listed as serving");
    const reach = await page.textContent("#p-reach");
    check(/Reachability: (public|behind NAT, hole-punchable|relayed only|unreachable|unknown)/.test(reach), "the provider view says the node's reachability: " + reach);

    const buyerRow = () => page.evaluate((peer) => {
      for (const tr of document.querySelectorAll("#p-accounts tbody tr")) {
        const code = tr.querySelector("code");
        if (code && code.title === peer && tr.cells[1].textContent === "buys from us") {
          return [tr.cells[2].textContent, tr.cells[6].textContent];
        }
      }
      return null;
    }, BUYER_PEER);
    await page.waitForFunction((peer) => [...document.querySelectorAll("#p-accounts code")].some((c) => c.title === peer), BUYER_PEER);
    const before = await buyerRow();
    check(before !== null, "the buyer's account is listed: deposits " + before[0] + ", available " + before[1]);

    // A refused deposit: the API's reason, and the balance as it was.
    await page.fill("#deposit-peer", BUYER_PEER);
    await page.fill("#deposit-tokens", "-3");
    await page.click("#deposit-form button[type=submit]");
    await page.waitForSelector("#deposit-result.bad");
    check((await page.textContent("#deposit-result")).includes("negative"), "a negative deposit is refused in words");

    await page.fill("#deposit-tokens", "12.5");
    await page.fill("#deposit-memo", "cash at the meetup");
    await page.click("#deposit-form button[type=submit]");
    await page.waitForSelector("#deposit-result.ok");
    check((await page.textContent("#deposit-result")).includes("Recorded 12.500000 tok"), "the deposit is recorded");
    const want = (Number(before[0].replace(" tok", "")) + 12.5).toFixed(6) + " tok";
    await page.waitForFunction(([peer, want]) => {
      for (const tr of document.querySelectorAll("#p-accounts tbody tr")) {
        const code = tr.querySelector("code");
        if (code && code.title === peer && tr.cells[1].textContent === "buys from us") return tr.cells[2].textContent === want;
      }
      return false;
    }, [BUYER_PEER, want]);
    const after = await buyerRow();
    check(after[0] === want && after[1] !== before[1], "the buyer's balance changed: deposits " + before[0] + " -> " + after[0] + ", available " + before[1] + " -> " + after[1]);
    await page.fill("#deposit-peer", "");
    await page.fill("#deposit-tokens", "");
    await page.fill("#deposit-memo", "");
    await page.screenshot({ path: path.join(SHOTS, "dashboard-provider.png"), fullPage: true });

    check(consoleErrors.filter((e) => !e.includes("401") && !e.includes("400")).length === 0,
      "no script errors (" + consoleErrors.join(" | ") + ")");
    console.log("all dashboard checks passed");
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
