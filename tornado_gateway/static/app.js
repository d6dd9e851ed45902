/* Deepfake check: the gateway's web page. Plain JS, no framework, no build, no network
 * access beyond this gateway. Every field read from the API is optional: missing values are
 * shown as "—", never thrown on. */
(function () {
  "use strict";

  var DASH = "—";
  var API = {
    status: "/api/gateway/status",
    analyze: "/api/deepfake/analyze",
    feedback: "/api/deepfake/feedback",
    stats: "/api/deepfake/stats",
    retrain: "/api/deepfake/retrain"
  };
  var VERDICTS = {
    declared_ai: {
      title: "Declared AI-generated",
      sub: "The file's own metadata declares that an AI generator made it (see Provenance).",
      icon: "!"
    },
    declared_capture: {
      title: "Declared a camera capture",
      sub: "Content Credentials from a trusted issuer declare a capture (see Provenance).",
      icon: "✓"
    },
    upsampling_traces: {
      title: "Up-sampling traces found",
      sub: "Often left by image generators, also by ordinary enlargement.",
      icon: "~"
    },
    no_traces_found: {
      title: "No up-sampling traces found",
      sub: "That does not show it is a camera photo: many generators leave no such trace.",
      icon: "·"
    },
    inconclusive: {
      title: "Can't tell",
      sub: "The evidence is too weak or the image is out of scope.",
      icon: "?"
    }
  };
  var DEFAULT_CAPABILITIES =
    "The model looks for the fine, regular traces that image generators leave when they " +
    "enlarge (up-sample) a picture. It is not validated on every kind of generator (for " +
    "example diffusion models) nor on heavily edited, resized or re-compressed images, so " +
    "treat its answer as a hint, not proof.";

  // ---------------------------------------------------------------- small helpers

  function $(id) { return document.getElementById(id); }

  function get(obj, path) {
    var parts = path.split(".");
    var cur = obj;
    for (var i = 0; i < parts.length; i++) {
      if (cur === null || cur === undefined || typeof cur !== "object") return undefined;
      cur = cur[parts[i]];
    }
    return cur;
  }

  function isNum(v) { return typeof v === "number" && isFinite(v); }

  function show(v) {
    if (v === null || v === undefined || v === "") return DASH;
    if (typeof v === "boolean") return v ? "yes" : "no";
    if (typeof v === "number") return isFinite(v) ? String(v) : DASH;
    if (typeof v === "object") {
      try { return JSON.stringify(v); } catch (e) { return DASH; }
    }
    return String(v);
  }

  function num(v, digits) {
    if (!isNum(v)) return DASH;
    if (Number.isInteger(v)) return v.toLocaleString("en-US");
    return v.toFixed(digits === undefined ? 3 : digits);
  }

  function percent(v) {
    if (!isNum(v)) return DASH;
    return Math.round(Math.max(0, Math.min(1, v)) * 100) + "%";
  }

  function bytes(v) {
    if (!isNum(v)) return DASH;
    if (v < 1024) return v + " bytes";
    if (v < 1024 * 1024) return (v / 1024).toFixed(1) + " KB";
    return (v / (1024 * 1024)).toFixed(1) + " MB";
  }

  function duration(ms) {
    if (!isNum(ms)) return DASH;
    if (ms < 1000) return Math.round(ms) + " ms";
    return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + " s";
  }

  function seconds(s) {
    if (!isNum(s)) return DASH;
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  function when(v) {
    if (v === null || v === undefined || v === "") return DASH;
    var d = isNum(v) ? new Date(v > 1e12 ? v : v * 1000) : new Date(String(v));
    if (isNaN(d.getTime())) return show(v);
    var ago = (Date.now() - d.getTime()) / 1000;
    var rel = "";
    if (ago >= -5 && ago < 45) rel = " (just now)";
    else if (ago >= 45 && ago < 3600) rel = " (" + Math.round(ago / 60) + " min ago)";
    else if (ago >= 3600 && ago < 86400) rel = " (" + Math.round(ago / 3600) + " h ago)";
    return d.toLocaleString() + rel;
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (k === "text") node.textContent = attrs[k];
        else if (k === "className") node.className = attrs[k];
        else node.setAttribute(k, attrs[k]);
      });
    }
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  /** A list item from text where `backticked` parts are shown as code. */
  function richItem(text) {
    var li = document.createElement("li");
    String(text).split("`").forEach(function (part, i) {
      if (!part) return;
      li.appendChild(i % 2 ? el("code", { text: part }) : document.createTextNode(part));
    });
    return li;
  }

  function fillFacts(dl, rows) {
    clear(dl);
    rows.forEach(function (r) {
      dl.appendChild(el("dt", { text: r[0] }));
      var dd = el("dd", { text: r[1] === undefined || r[1] === null || r[1] === "" ? DASH : r[1] });
      if (r[2]) dd.setAttribute("data-field", r[2]);
      dl.appendChild(dd);
    });
  }

  function humanize(key) {
    var known = {
      accuracy: "Accuracy", auc: "ROC AUC", roc_auc: "ROC AUC", f1: "F1 score",
      precision: "Precision", recall: "Recall", log_loss: "Log loss", brier: "Brier score",
      n_train: "Training images", n_test: "Test images", n_val: "Validation images",
      n_images: "Images evaluated", n_crops: "Regions evaluated", n_groups: "Photo groups",
      real_recall: "Real photos recognised", fake_recall: "Generated images caught",
      baseline_accuracy: "Accuracy on the baseline images",
      feedback_accuracy: "Accuracy on feedback images",
      accuracy_by_kind: "Accuracy by kind of image", validation: "How it was measured",
      n_samples: "Samples", samples: "Samples", balanced_accuracy: "Balanced accuracy",
      tpr: "True positive rate", fpr: "False positive rate", threshold: "Threshold"
    };
    if (known[key]) return known[key];
    var s = String(key).replace(/_/g, " ");
    return s.charAt(0).toUpperCase() + s.slice(1);
  }

  function metricValue(v, key) {
    if (isNum(v)) {
      if (Number.isInteger(v) && !/accuracy|recall|precision/.test(key || "")) return num(v);
      if (/accuracy|recall|precision/.test(key || "") && v >= 0 && v <= 1) return (v * 100).toFixed(1) + "%";
      return v.toFixed(3);
    }
    if (v && typeof v === "object" && !Array.isArray(v)) {
      return Object.keys(v).map(function (k) { return k + ": " + metricValue(v[k], key); }).join(" · ");
    }
    return show(v);
  }

  function metricNode(v, key) {
    if (v && typeof v === "object" && !Array.isArray(v)) {
      var ul = el("ul", { className: "sub-metrics" });
      Object.keys(v).forEach(function (k) {
        ul.appendChild(el("li", null, [k.replace(/\//g, " / ").replace(/_/g, " ") + ": ",
                                       el("strong", { text: metricValue(v[k], key) })]));
      });
      var det = el("details", null, [el("summary", { text: Object.keys(v).length + " values" }), ul]);
      return det;
    }
    return null;
  }

  function metricsInWords(m) {
    if (!m || typeof m !== "object") return "";
    var acc = isNum(m.balanced_accuracy) ? m.balanced_accuracy : m.accuracy;
    if (!isNum(acc) || acc < 0 || acc > 1) return "";
    var s = "In plain words: on test images it had not seen, it was right about " +
      Math.round(acc * 100) + " times out of 100.";
    if (isNum(m.fake_recall) && isNum(m.real_recall)) {
      s += " It caught " + Math.round(m.fake_recall * 100) + "% of the enlarged (generator-like) images and recognised " +
        Math.round(m.real_recall * 100) + "% of the real photos.";
    }
    return s;
  }

  /** Parse an API answer: {ok, status, data, retryAfter}. Never throws. */
  function parseResponse(status, text, retryAfter) {
    var data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (e) { data = null; }
    }
    return { ok: status >= 200 && status < 300, status: status, data: data, text: text || "",
             retryAfter: retryAfter || null };
  }

  // ---------------------------------------------------------------- the API token
  // When the gateway requires a token (auth.py), the page takes it from ?token=... (then
  // removes it from the address bar) or asks for it, keeps it in sessionStorage for this tab
  // only, and sends it as "Authorization: Bearer ..." with its own /api/ requests, never to
  // another origin. It is never written to the console nor put back in a URL.

  var TOKEN_KEY = "tornado_gateway.api_token";
  var apiToken = null;       // the token this tab sends (null: none)
  var authRequired = false;  // the gateway said it needs one (status body or a 401)
  var tokenWaiters = [];     // requests waiting for a token before they are sent again

  function storeToken(token) {
    apiToken = token || null;
    try {
      if (apiToken) sessionStorage.setItem(TOKEN_KEY, apiToken);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage off: the token lives as long as the page */ }
  }

  (function takeToken() {
    try { apiToken = sessionStorage.getItem(TOKEN_KEY) || null; } catch (e) { apiToken = null; }
    var params;
    try { params = new URLSearchParams(location.search); } catch (e) { return; }
    if (!params.has("token")) return;
    var fromUrl = (params.get("token") || "").trim();
    params.delete("token");
    var query = params.toString();
    try {
      history.replaceState(history.state, "", location.pathname + (query ? "?" + query : "") + location.hash);
    } catch (e) { /* an old browser keeps the URL; the token is still only sent here */ }
    if (fromUrl) storeToken(fromUrl);
  })();

  /** True for a URL of this gateway's API: the only place the token is ever sent. */
  function isOwnApi(url) {
    var u;
    try { u = new URL(url, location.href); } catch (e) { return false; }
    return u.origin === location.origin && u.pathname.indexOf("/api/") === 0;
  }

  /** The Authorization header value for url, or null. */
  function authFor(url) {
    return apiToken && isOwnApi(url) ? "Bearer " + apiToken : null;
  }

  /** A promise that resolves once a token has been accepted; asks for one (once). `refused`:
   * the token this tab sent was refused (it changed where the gateway runs). */
  function waitForToken(refused) {
    return new Promise(function (resolve) {
      tokenWaiters.push(resolve);
      askToken(refused);
    });
  }

  function askToken(refused) {
    authRequired = true;
    if (refused && apiToken) storeToken(null);
    var panel = $("token-panel");
    var wasHidden = panel.hidden;
    if (!wasHidden && !refused) return;  // already asking: keep what it says
    $("token-why").textContent = refused
      ? "The gateway does not accept the token this tab had: it may have been changed where " +
        "the gateway runs (or mistyped). Enter the current one to carry on."
      : "This gateway only analyses images, saves answers and retrains for people who have its " +
        "access token. Enter it once; this tab remembers it until you close it.";
    panel.hidden = false;
    if (wasHidden) {
      $("token-error").hidden = true;
      $("token-input").value = "";
      $("token-input").focus();
    }
  }

  function tokenAccepted(token, statusRes) {
    storeToken(token);
    $("token-panel").hidden = true;
    $("token-error").hidden = true;
    $("token-input").value = "";
    var waiters = tokenWaiters;
    tokenWaiters = [];
    if (statusRes) applyStatus(statusRes);
    startStats();
    waiters.forEach(function (resolve) { resolve(); });
  }

  function tokenError(text) {
    var box = $("token-error");
    box.textContent = text;
    box.hidden = false;
    $("token-input").focus();
    $("token-input").select();
  }

  function submitToken(ev) {
    ev.preventDefault();
    var candidate = $("token-input").value.trim();
    if (!candidate) { tokenError("Enter the token first."); return; }
    var button = $("token-submit");
    button.disabled = true;
    button.textContent = "Checking…";
    // the status endpoint answers 200 either way: the full body only for the right token
    fetch(API.status, { headers: { "Accept": "application/json", "Authorization": "Bearer " + candidate },
                        cache: "no-store" }).then(function (resp) {
      return resp.text().then(function (text) { return parseResponse(resp.status, text, null); });
    }, function () {
      return { ok: false, status: 0, data: null, text: "", retryAfter: null };
    }).then(function (res) {
      button.disabled = false;
      button.textContent = "Use this token";
      if (res.status === 0 || !res.data || typeof res.data !== "object") {
        tokenError("Could not reach the gateway to check the token. Check that it is running and try again.");
      } else if (get(res.data, "auth.required") === true || res.status === 401) {
        tokenError("The gateway did not accept this token. Check it (it is case-sensitive) and try again.");
      } else {
        tokenAccepted(candidate, res);
      }
    });
  }

  function requestJSON(method, url, body) {
    var opts = { method: method, headers: { "Accept": "application/json" }, cache: "no-store" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    var auth = authFor(url);
    if (auth) opts.headers["Authorization"] = auth;
    return fetch(url, opts).then(function (resp) {
      return resp.text().then(function (text) {
        return parseResponse(resp.status, text, resp.headers.get("Retry-After"));
      });
    }, function () {
      return { ok: false, status: 0, data: null, text: "", retryAfter: null };
    }).then(function (res) {
      // refused before it reached the service (no side effect): get a token, then send again
      if (res.status === 401 && isOwnApi(url)) {
        if (apiToken && auth !== "Bearer " + apiToken) return requestJSON(method, url, body);
        return waitForToken(!!auth).then(function () { return requestJSON(method, url, body); });
      }
      return res;
    });
  }

  /** The {message, suggestion} to show for a failed request. */
  function errorInfo(res, what) {
    var d = res.data || {};
    var message = typeof d.message === "string" && d.message ? d.message : null;
    var suggestion = typeof d.suggestion === "string" && d.suggestion ? d.suggestion : null;
    if (!message) {
      if (res.status === 0) {
        message = "Could not reach the gateway while " + what + ".";
        suggestion = suggestion || "Check that the gateway is still running (python -m tornado_gateway) and reload this page.";
      } else if (res.status === 413) {
        message = "The image is too large for the service.";
        suggestion = suggestion || "Try a smaller image (fewer pixels or a JPEG).";
      } else if (res.status === 503 || res.status === 502 || res.status === 504) {
        message = "The detection service is not available right now.";
        suggestion = suggestion || "See the status message at the top of the page.";
      } else {
        message = "Something went wrong while " + what + " (HTTP " + res.status + ").";
      }
    }
    if (res.retryAfter && /^\d+$/.test(res.retryAfter)) {
      suggestion = (suggestion ? suggestion + " " : "") + "You can retry in about " + res.retryAfter + " s.";
    }
    return { message: message, suggestion: suggestion, code: d.error || null, status: res.status };
  }

  function renderError(box, info) {
    clear(box);
    box.appendChild(el("p", { className: "error-message", text: info.message }));
    if (info.suggestion) {
      box.appendChild(el("p", { className: "error-suggestion" }, [
        el("strong", { text: "What to do: " }), info.suggestion
      ]));
    }
    box.hidden = false;
  }

  // ---------------------------------------------------------------- gateway status

  var pollMs = 3000;
  (function () {
    var m = /[?&]poll=(\d+)/.exec(location.search);
    if (m) pollMs = Math.max(250, Math.min(60000, parseInt(m[1], 10)));
  })();
  var serviceReady = null;
  var statusTimer = null;

  var STATE_TEXT = {
    idle: ["Service not started", "The gateway has not started the detection service yet."],
    starting: ["Service starting…", "The detection service is starting; this usually takes a few seconds."],
    ready: ["Service ready", "The detection service is running."],
    unhealthy: ["Service not responding", "The detection service is running but does not answer its health checks."],
    failed: ["Service failed to start", "The detection service could not be started."],
    exited: ["Service stopped", "The detection service has stopped unexpectedly."],
    stopping: ["Service stopping", "The gateway is shutting the detection service down."],
    stopped: ["Service stopped", "The detection service has been stopped."]
  };

  function fixSteps(svc, state) {
    var steps = [];
    if (state === "starting") {
      steps.push("Wait a few seconds — this page updates by itself when the service is ready.");
    } else if (state === "unhealthy") {
      steps.push("Wait a little: the service may be busy (for example retraining) and recover by itself.");
    } else if (state === "exited" && (get(svc, "auto_restart") || 0) > (get(svc, "restarts") || 0)) {
      steps.push("Wait a few seconds: the gateway restarts the service by itself (restart " +
                 ((get(svc, "restarts") || 0) + 1) + " of " + get(svc, "auto_restart") +
                 ") and this page updates when it is back.");
    }
    if (get(svc, "external")) {
      steps.push("The service runs separately from the gateway" +
                 (get(svc, "url") ? " (at " + get(svc, "url") + ")" : "") +
                 ": start it again, e.g. `python python/api_server.py --port <port>`.");
    }
    steps.push("Look at the terminal where the gateway runs: the service's own error lines are printed there (and under Technical details below).");
    steps.push("If it does not come back, stop the gateway with `Ctrl+C` and start it again: `python -m tornado_gateway`");
    return steps;
  }

  var lastUnavailable = null;

  function renderUnavailable(svc, state, gatewayDown) {
    // re-render (and so re-announce the alert) only when what it says changes
    var signature = JSON.stringify([gatewayDown, state, get(svc, "message"), get(svc, "last_exit"),
                                    get(svc, "last_error"), get(svc, "restarts"), get(svc, "external"),
                                    get(svc, "last_health_check.ok"), get(svc, "last_health_check.detail")]);
    if (signature === lastUnavailable && !$("unavailable").hidden) return;
    lastUnavailable = signature;
    var panel = $("unavailable");
    var what = $("unavailable-what");
    var msg = $("unavailable-message");
    var fix = $("unavailable-fix");
    var details = $("unavailable-details");
    clear(fix);
    if (gatewayDown) {
      what.textContent = "This page cannot reach the gateway.";
      msg.textContent = "The gateway process may have stopped, or the network connection is down.";
      msg.hidden = false;
      ["Check that the gateway is still running in its terminal.",
       "Start it again with: `python -m tornado_gateway`",
       "This page reconnects by itself once the gateway answers."].forEach(function (s) { fix.appendChild(richItem(s)); });
      details.hidden = true;
      panel.hidden = false;
      return;
    }
    var st = STATE_TEXT[state] || ["Service unavailable", "The detection service is in state “" + show(state) + "”."];
    var lastExit = get(svc, "last_exit");
    var whatText = st[1];
    if (state === "starting" && lastExit && typeof lastExit === "object") {
      whatText = "The detection service stopped unexpectedly and is being restarted.";
    }
    what.textContent = whatText + " Analysing images, feedback and retraining will not work until it is back.";
    var message = get(svc, "message");
    msg.textContent = typeof message === "string" ? message : "";
    msg.hidden = !msg.textContent;
    fixSteps(svc, state).forEach(function (s) { fix.appendChild(richItem(s)); });

    var facts = [["State", show(state)], ["Restarts so far", show(get(svc, "restarts"))]];
    if (lastExit && typeof lastExit === "object") {
      var how = [];
      if (lastExit.code !== null && lastExit.code !== undefined) how.push("exit code " + lastExit.code);
      if (lastExit.signal !== null && lastExit.signal !== undefined) how.push("signal " + lastExit.signal);
      facts.push(["Last exit", (how.join(", ") || DASH) + (lastExit.at ? " at " + when(lastExit.at) : "")]);
    }
    var hc = get(svc, "last_health_check");
    if (hc && typeof hc === "object") {
      facts.push(["Last health check", (hc.ok ? "ok" : "failed") + (hc.detail ? " — " + show(hc.detail) : "") +
                  (hc.at ? " (" + when(hc.at) + ")" : "")]);
    }
    var lastError = get(svc, "last_error");
    if (lastError && typeof lastError === "object") {
      facts.push(["Last error", [lastError.message, lastError.suggestion].filter(function (x) {
        return typeof x === "string" && x; }).join(" ") || show(lastError)]);
    }
    if (get(svc, "url")) facts.push(["Service URL", show(get(svc, "url"))]);
    if (get(svc, "pid") !== undefined) facts.push(["Service process ID", show(get(svc, "pid"))]);
    fillFacts($("unavailable-facts"), facts);
    var tail = lastExit && Array.isArray(lastExit.stderr_tail) ? lastExit.stderr_tail : [];
    var pre = $("unavailable-stderr");
    pre.textContent = tail.map(String).join("\n");
    pre.hidden = tail.length === 0;
    details.hidden = false;
    panel.hidden = false;
  }

  function setBadge(kind, text, state, title) {
    var badge = $("status-badge");
    badge.className = "badge badge-" + kind;
    badge.setAttribute("data-state", state || kind);
    badge.title = title || "";
    // only touch the live region when the words change, so nothing is announced on every poll
    if ($("status-text").textContent !== text) $("status-text").textContent = text;
  }

  function applyStatus(res, sentAuth) {
    if (res.status === 0 || !res.data || typeof res.data !== "object") {
      setBadge("down", "Gateway unreachable", "gateway-unreachable");
      renderUnavailable(null, null, true);
      setReady(false);
      startStats();
      return;
    }
    // without the token the status is reduced and says so: ask for it (again, if it was sent)
    var locked = get(res.data, "auth.required") === true;
    if (locked && (!apiToken || sentAuth === "Bearer " + apiToken)) askToken(!!sentAuth);
    if (!locked) startStats();
    var svc = get(res.data, "service") || {};
    var state = typeof svc.state === "string" ? svc.state : "unknown";
    var ready = svc.ready === true || (svc.ready === undefined && state === "ready");
    if (ready) {
      var up = get(svc, "uptime_s");
      var workers = Array.isArray(svc.workers) ? svc.workers : [];
      var serving = workers.filter(function (w) { return w && w.state === "ready"; }).length;
      var total = workers.length;
      if (!total && isNum(svc.workers) && isNum(svc.workers_ready)) {  // the reduced status
        total = svc.workers;
        serving = svc.workers_ready;
      }
      var some = total > 1 && serving < total;
      setBadge(some ? "warn" : "ok",
               "Service ready" + (total > 1 ? " (" + serving + " of " + total + " workers)" : ""),
               state, isNum(up) ? "Running for " + seconds(up)
                                : (locked ? "Enter the access token for the full status" : ""));
      $("unavailable").hidden = true;
      lastUnavailable = null;
    } else {
      var st = STATE_TEXT[state];
      var kind = state === "starting" ? "warn" : "down";
      setBadge(kind, "Service unavailable: " + (st ? st[0].replace(/^Service /, "") : state), state);
      renderUnavailable(svc, state, false);
    }
    var wasReady = serviceReady;
    setReady(ready);
    if (ready && wasReady === false) loadStats();  // came back: refresh what it knows
  }

  function setReady(ready) {
    serviceReady = ready;
    $("stats-stale").hidden = ready;
    document.body.setAttribute("data-service-ready", ready ? "true" : "false");
  }

  function pollStatus() {
    if (statusTimer) { clearTimeout(statusTimer); statusTimer = null; }
    var sentAuth = authFor(API.status);
    // the status endpoint never answers 401: a reduced body says a token is needed
    var opts = { headers: { "Accept": "application/json" }, cache: "no-store" };
    if (sentAuth) opts.headers["Authorization"] = sentAuth;
    return fetch(API.status, opts).then(function (resp) {
      return resp.text().then(function (text) { return parseResponse(resp.status, text, null); });
    }, function () {
      return { ok: false, status: 0, data: null, text: "", retryAfter: null };
    }).then(function (res) {
      applyStatus(res, sentAuth);
    }).catch(function () {
      // applyStatus never throws, but be safe: keep polling whatever happens
    }).then(function () {
      // poll faster while the service is not ready, so recovery shows quickly
      var next = serviceReady ? pollMs : Math.max(250, Math.min(pollMs, 1500));
      statusTimer = setTimeout(pollStatus, next);
    });
  }

  // the statistics are first loaded once the page knows it may (no token needed, or it has one)
  var statsStarted = false;
  function startStats() {
    if (statsStarted) return;
    statsStarted = true;
    loadStats();
  }

  /** Called when a request got 502/503/504 or no answer: show it now, don't wait for the poll. */
  function serviceProblem() { pollStatus(); }

  // ---------------------------------------------------------------- upload + analyze

  var currentXhr = null;
  var currentAnalysis = null;
  var previewUrl = null;

  function resetResult() {
    uploadSeq++;  // an upload waiting for the token is not sent once another file is chosen
    $("result-error").hidden = true;
    $("result-body").hidden = true;
    $("spectrum-panel").hidden = true;
    $("feedback-panel").hidden = true;
    $("fb-confirm").hidden = true;
    clear($("fb-result"));
    currentAnalysis = null;
  }

  function showPreview(file) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    var img = $("preview-img");
    var cap = $("preview-caption");
    cap.textContent = (file.name || "image") + " · " + bytes(file.size);
    img.alt = "Preview of " + (file.name || "the chosen image");
    try {
      previewUrl = URL.createObjectURL(file);
      img.src = previewUrl;
      img.hidden = false;
    } catch (e) {
      img.hidden = true;
    }
    img.onerror = function () {
      // e.g. TIFF: the browser can't show it, the service may still read it
      img.hidden = true;
      cap.textContent = (file.name || "image") + " · " + bytes(file.size) + " (no preview in this browser)";
    };
    $("preview").hidden = false;
  }

  function handleFile(file) {
    if (!file) return;
    resetResult();
    showPreview(file);
    if (file.type && !/^image\//.test(file.type)) {
      $("result-empty").hidden = true;
      renderError($("result-error"), {
        message: "“" + file.name + "” does not look like an image (" + file.type + ").",
        suggestion: "Choose a PNG, JPEG, WebP, BMP, TIFF or GIF file."
      });
      return;
    }
    if (maxUpload && isNum(file.size) && file.size > maxUpload) {
      $("result-empty").hidden = true;
      renderError($("result-error"), {
        message: "“" + file.name + "” is " + bytes(file.size) + "; the service accepts at most " + bytes(maxUpload) + ".",
        suggestion: "Use a smaller file, for example save it as JPEG."
      });
      return;
    }
    upload(file);
  }

  var uploadSeq = 0;

  function upload(file) {
    if (currentXhr) currentXhr.abort();
    var seq = ++uploadSeq;
    var xhr = new XMLHttpRequest();
    currentXhr = xhr;
    var bar = $("upload-bar");
    var label = $("upload-label");
    var block = $("upload-progress");
    var started = Date.now();
    bar.value = 0;
    bar.max = 100;
    label.textContent = "Uploading " + (file.name || "image") + "… 0%";
    block.hidden = false;
    $("upload-cancel").hidden = false;
    $("result").setAttribute("aria-busy", "true");
    $("result-empty").hidden = false;
    $("result-empty").textContent = "Uploading and analysing…";

    xhr.upload.onprogress = function (ev) {
      if (ev.lengthComputable && ev.total > 0) {
        var p = Math.round((ev.loaded / ev.total) * 100);
        bar.value = p;
        label.textContent = "Uploading " + (file.name || "image") + "… " + p + "% (" +
          bytes(ev.loaded) + " of " + bytes(ev.total) + ")";
      }
    };
    xhr.upload.onload = function () {
      bar.removeAttribute("value");  // indeterminate: the service is working now
      label.textContent = "Uploaded. Analysing the image…";
    };
    function finish() {
      if (currentXhr === xhr) currentXhr = null;
      block.hidden = true;
      $("result").setAttribute("aria-busy", "false");
    }
    var auth = authFor(API.analyze);
    xhr.onload = function () {
      finish();
      var res = parseResponse(xhr.status, xhr.responseText, xhr.getResponseHeader("Retry-After"));
      if (res.status === 401) {  // refused before the service saw it: get a token, send again
        $("result-empty").hidden = false;
        $("result-empty").textContent = "Waiting for the access token (above) to analyse " + (file.name || "the image") + "…";
        var retry = function () { if (seq === uploadSeq) upload(file); };  // nothing newer chosen
        if (apiToken && auth !== "Bearer " + apiToken) retry();
        else waitForToken(!!auth).then(retry);
        return;
      }
      if (res.ok && res.data && typeof res.data === "object") {
        renderAnalysis(res.data, Date.now() - started);
      } else {
        $("result-empty").hidden = true;
        renderError($("result-error"), errorInfo(res, "analysing the image"));
        if (res.status === 502 || res.status === 503 || res.status === 504) serviceProblem();
      }
    };
    xhr.onerror = function () {
      finish();
      $("result-empty").hidden = true;
      renderError($("result-error"), errorInfo({ status: 0, data: null }, "uploading the image"));
      serviceProblem();
    };
    xhr.onabort = function () {
      finish();
      $("result-empty").hidden = false;
      $("result-empty").textContent = "Upload cancelled. Choose an image to try again.";
    };
    var form = new FormData();
    form.append("file", file, file.name || "image");
    xhr.open("POST", API.analyze);
    xhr.setRequestHeader("Accept", "application/json");
    if (auth) xhr.setRequestHeader("Authorization", auth);
    xhr.send(form);
  }

  function signalWords(signal) {
    var p = signal.score;
    if (!isNum(p)) {
      return "Spectral signal: no score (" + (signal.reason || "not computed") + "). " +
        "The score is 0% to 100%: how strongly the spectrum matches up-sampling.";
    }
    var s = "Spectral signal: up-sampling score " + percent(p) + ".";
    if (signal.status === "traces_found") s += " Up-sampling traces found: image generators leave them, and so does ordinary enlargement (zoom, upscaling).";
    else if (signal.status === "no_traces_found") s += " No up-sampling traces: that does not make it a camera photo.";
    else s += " Inconclusive" + (signal.reason ? ": " + signal.reason : "") + ".";
    return s;
  }

  function scoreText(v) {
    if (!isNum(v)) return DASH;
    return v >= 100 ? String(Math.round(v)) : v.toFixed(v >= 10 ? 1 : 2);
  }

  var RESAMPLING_STATUS = {
    traces_found: "Found",
    no_traces_found: "Not found",
    inconclusive: "Inconclusive"
  };

  /** The resampling signal (signal.resampling): status, score against its threshold, why. */
  function resamplingWords(rs) {
    var score = rs.score, threshold = rs.threshold;
    var against = isNum(score)
      ? "score " + scoreText(score) + (isNum(threshold)
          ? (score >= threshold ? ", at or above" : ", below") + " the threshold of " + scoreText(threshold) +
            (threshold > 0 ? " (" + (score / threshold).toFixed(1) + "× the threshold)" : "")
          : "")
      : "";
    if (rs.status === "traces_found") {
      return "Resampling signal: traces found — " + against +
        (isNum(rs.peak_frequency) ? "; the periodic pattern peaks at " + rs.peak_frequency.toFixed(3) + " cycles/pixel" : "") +
        ". The image was resized, by a factor that need not be a whole number. Image generators " +
        "resize, and so does any ordinary resizing (and finely repeating content can look the same): " +
        "found means resized, not generated.";
    }
    if (rs.status === "no_traces_found") {
      return "Resampling signal: no traces found — " + (against || "no periodic pattern") +
        ". No sign of resizing; that does not make it a camera photo.";
    }
    if (rs.status === "inconclusive") {
      return "Resampling signal: inconclusive — " + (typeof rs.reason === "string" && rs.reason
        ? rs.reason : "not examined" + (rs.reason_code ? " (" + show(rs.reason_code) + ")" : "")) + ".";
    }
    return "Resampling signal: not reported by the service.";
  }

  function renderResampling(rs) {
    rs = rs && typeof rs === "object" ? rs : {};
    var status = RESAMPLING_STATUS[rs.status] ? rs.status : "unknown";
    $("resampling").setAttribute("data-status", status);
    $("resampling-status").textContent = RESAMPLING_STATUS[status] || "";
    $("resampling-summary").textContent = resamplingWords(rs);
    var meter = $("resampling-meter");
    var score = rs.score, threshold = rs.threshold;
    var drawable = isNum(score) && isNum(threshold) && threshold > 0;
    meter.hidden = !drawable;
    $("resampling-scale").hidden = !drawable;
    if (!drawable) return;
    // the threshold in the middle, twice the threshold (or more) at the right end
    var max = 2 * threshold;
    meter.setAttribute("aria-valuemax", String(max));
    meter.setAttribute("aria-valuenow", String(Math.max(0, Math.min(max, score))));
    meter.setAttribute("aria-valuetext", "score " + scoreText(score) + ", threshold " + scoreText(threshold) +
                       (score >= threshold ? ": traces found" : ": below the threshold"));
    $("resampling-marker").style.left = (Math.max(0, Math.min(1, score / max)) * 100) + "%";
    $("resampling-threshold-label").textContent = "threshold " + scoreText(threshold);
    $("resampling-max-label").textContent = scoreText(max) + (score > max ? "+" : "");
  }

  function renderProvenance(prov) {
    var list = $("provenance-items");
    clear(list);
    var items = Array.isArray(prov.items) ? prov.items : [];
    items.forEach(function (item) {
      var li = el("li", {});
      li.setAttribute("data-source", show(item.source));
      li.appendChild(el("strong", { text: show(item.where) + ": " }));
      li.appendChild(document.createTextNode(show(item.says)));
      list.appendChild(li);
    });
    list.hidden = items.length === 0;
    var trust = prov.c2pa_trust_list ? " C2PA trust list: " + prov.c2pa_trust_list + "." : "";
    $("provenance-summary").textContent = items.length
      ? items.length + " item" + (items.length === 1 ? "" : "s") + " found in the file's metadata." + trust
      : (prov.note || "None found. Absence proves nothing.") + trust;
  }

  function renderAnalysis(data, clientMs) {
    currentAnalysis = data;
    $("result-empty").hidden = true;
    $("result-error").hidden = true;
    var verdict = typeof data.verdict === "string" ? data.verdict : "";
    var v = VERDICTS[verdict] || { title: verdict ? verdict.replace(/_/g, " ") : "No verdict", sub: "", icon: "?" };
    var box = $("verdict");
    box.setAttribute("data-verdict", verdict || "unknown");
    $("verdict-icon").textContent = v.icon;
    $("verdict-title").textContent = v.title;
    $("verdict-sub").textContent = typeof data.headline === "string" && data.headline ? data.headline : v.sub;

    var signal = data.signal && typeof data.signal === "object" ? data.signal : {};
    var p = signal.score;
    var meter = $("prob-meter");
    if (isNum(p)) {
      var clamped = Math.max(0, Math.min(1, p));
      meter.setAttribute("aria-valuenow", String(Math.round(clamped * 100)));
      meter.setAttribute("aria-valuetext", "up-sampling score " + percent(p));
      $("prob-marker").style.left = (clamped * 100) + "%";
      $("prob-marker").hidden = false;
    } else {
      meter.removeAttribute("aria-valuenow");
      meter.setAttribute("aria-valuetext", "unknown");
      $("prob-marker").hidden = true;
    }
    $("prob-text").textContent = signalWords(signal);
    $("signal-summary").textContent = signalWords(signal);
    var rs = signal.resampling && typeof signal.resampling === "object" ? signal.resampling : {};
    renderResampling(rs);
    renderProvenance(data.provenance && typeof data.provenance === "object" ? data.provenance : {});

    var expl = data.explanation;
    if (expl && typeof expl === "object") expl = expl.summary || expl.text || show(expl);
    $("explanation").textContent = typeof expl === "string" ? expl : "";
    $("explanation").hidden = !$("explanation").textContent;

    var warnings = Array.isArray(data.warnings) ? data.warnings : [];
    var ul = $("warnings");
    clear(ul);
    warnings.forEach(function (w) {
      ul.appendChild(el("li", { text: typeof w === "string" ? w : (w && (w.message || w.text)) || show(w) }));
    });
    $("warnings-block").hidden = warnings.length === 0;

    var img = data.image || {};
    var dims = isNum(img.width) && isNum(img.height) ? img.width + " × " + img.height + " px" : DASH;
    var regions = data.regions_examined;
    if (regions && typeof regions === "object") regions = regions.count !== undefined ? regions.count : show(regions);
    fillFacts($("result-facts"), [
      ["Up-sampling score (signal)", isNum(p) ? percent(p) + " (" + p.toFixed(3) + ")" : "none: " + show(signal.reason_code), "probability"],
      ["Resampling score (signal)", isNum(rs.score)
        ? scoreText(rs.score) + (isNum(rs.threshold) ? " (threshold " + scoreText(rs.threshold) + ")" : "")
        : "none: " + show(rs.reason_code || rs.status), "resampling-score"],
      ["Verdict rule", data.verdict_rule ? show(data.verdict_rule) + " (from " + show(data.verdict_basis) + ")" : DASH, "rule"],
      ["Time to analyse", duration(data.elapsed_ms) +
        (isNum(clientMs) ? " (" + duration(clientMs) + " including upload)" : ""), "elapsed"],
      ["Image", dims + (img.format ? " · " + show(img.format) : "") + (isNum(img.bytes) ? " · " + bytes(img.bytes) : "")],
      ["Regions examined", isNum(regions) ? num(regions) + " patches of 64 × 64 px" : show(regions)],
      ["Model version", show(data.model_version)],
      ["Analysis ID", show(data.analysis_id), "analysis-id"]
    ]);
    $("result-body").hidden = false;

    renderSpectrum(data.spectrum);
    var canFeedback = typeof data.analysis_id === "string" || isNum(data.analysis_id);
    $("feedback-panel").hidden = !canFeedback;
    $("fb-confirm").hidden = true;
    clear($("fb-result"));
    setFeedbackButtons(false);
  }

  // ---------------------------------------------------------------- spectrum chart (SVG)

  var SVGNS = "http://www.w3.org/2000/svg";
  var lastSpectrum = null;
  function svg(tag, attrs, text) {
    var n = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { n.setAttribute(k, attrs[k]); });
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function renderSpectrum(spec) {
    var panel = $("spectrum-panel");
    var chart = $("spectrum-chart");
    var tbody = document.querySelector("#spectrum-table tbody");
    clear(chart);
    clear(tbody);
    var ys = get(spec, "log_magnitude") || get(spec, "values") || get(spec, "radial");
    var xs = get(spec, "frequencies");
    if (!Array.isArray(ys)) { panel.hidden = true; return; }
    var pts = [];
    for (var i = 0; i < ys.length; i++) {
      var x = Array.isArray(xs) && isNum(xs[i]) ? xs[i] : (ys.length > 1 ? i / (ys.length - 1) : 0);
      if (isNum(ys[i]) && isNum(x)) pts.push([x, ys[i]]);
    }
    if (pts.length < 2) { panel.hidden = true; return; }
    panel.hidden = false;

    lastSpectrum = spec;
    // draw at the container's own width so text stays readable on a phone
    var W = Math.round(Math.max(280, Math.min(640, chart.clientWidth || 560)));
    var H = Math.round(Math.max(200, Math.min(260, W * 0.45))), L = 48, R = 12, T = 12, B = 46;
    var minY = Infinity, maxY = -Infinity, minX = Infinity, maxX = -Infinity;
    pts.forEach(function (p) {
      minY = Math.min(minY, p[1]); maxY = Math.max(maxY, p[1]);
      minX = Math.min(minX, p[0]); maxX = Math.max(maxX, p[0]);
    });
    minX = Math.min(0, minX); maxX = Math.max(1, maxX);
    if (maxY - minY < 1e-9) { maxY += 1; minY -= 1; }
    var padY = (maxY - minY) * 0.08;
    minY -= padY; maxY += padY;
    function sx(x) { return L + (x - minX) / (maxX - minX) * (W - L - R); }
    function sy(y) { return T + (maxY - y) / (maxY - minY) * (H - T - B); }

    var root = svg("svg", {
      viewBox: "0 0 " + W + " " + H, role: "img", "aria-labelledby": "spectrum-svg-title spectrum-svg-desc",
      preserveAspectRatio: "xMidYMid meet", "class": "spectrum-svg"
    });
    var first = pts[0][1], last = pts[pts.length - 1][1];
    root.appendChild(svg("title", { id: "spectrum-svg-title" }, "Radial frequency spectrum of the image"));
    root.appendChild(svg("desc", { id: "spectrum-svg-desc" },
      pts.length + " points from coarse to fine detail; log magnitude falls from " +
      first.toFixed(2) + " to " + last.toFixed(2) + ". The shaded band marks the highest frequencies, where up-sampling traces appear."));

    // the band where generator traces live
    var bandX = sx(0.75);
    root.appendChild(svg("rect", { x: bandX, y: T, width: (W - R) - bandX, height: H - T - B, "class": "band" }));
    root.appendChild(svg("text", { x: (bandX + W - R) / 2, y: T + 14, "text-anchor": "middle", "class": "band-label" }, "generator traces"));

    // grid + y ticks
    for (var t = 0; t <= 4; t++) {
      var yv = minY + (maxY - minY) * t / 4;
      var yy = sy(yv);
      root.appendChild(svg("line", { x1: L, x2: W - R, y1: yy, y2: yy, "class": "grid" }));
      root.appendChild(svg("text", { x: L - 6, y: yy + 4, "text-anchor": "end", "class": "tick" }, (Math.abs(yv) < 0.05 ? 0 : yv).toFixed(1)));
    }
    // x ticks
    [0, 0.25, 0.5, 0.75, 1].forEach(function (xv) {
      var xx = sx(xv);
      root.appendChild(svg("line", { x1: xx, x2: xx, y1: H - B, y2: H - B + 4, "class": "axis" }));
      root.appendChild(svg("text", { x: xx, y: H - B + 16, "text-anchor": "middle", "class": "tick" }, String(xv)));
    });
    root.appendChild(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, "class": "axis" }));
    root.appendChild(svg("line", { x1: L, x2: L, y1: T, y2: H - B, "class": "axis" }));
    root.appendChild(svg("text", { x: L, y: H - 6, "text-anchor": "start", "class": "axis-label" }, "← coarse shapes"));
    root.appendChild(svg("text", { x: W - R, y: H - 6, "text-anchor": "end", "class": "axis-label" }, "finest detail →"));
    if (W >= 420) root.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", "class": "axis-label" }, "frequency"));
    root.appendChild(svg("text", {
      x: 12, y: (T + H - B) / 2, "text-anchor": "middle", "class": "axis-label",
      transform: "rotate(-90 12 " + ((T + H - B) / 2) + ")"
    }, "log magnitude"));

    var d = pts.map(function (p, k) { return (k ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1); }).join(" ");
    root.appendChild(svg("path", { d: d, "class": "curve" }));
    pts.forEach(function (p) {
      root.appendChild(svg("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.2, "class": "pt" }));
    });
    chart.appendChild(root);

    pts.forEach(function (p) {
      tbody.appendChild(el("tr", null, [el("td", { text: p[0].toFixed(3) }), el("td", { text: p[1].toFixed(3) })]));
    });
  }

  // ---------------------------------------------------------------- feedback

  var pendingLabel = null;

  function setFeedbackButtons(disabled) {
    $("fb-real").disabled = disabled;
    $("fb-fake").disabled = disabled;
  }

  function askFeedback(label) {
    if (!currentAnalysis) return;
    pendingLabel = label;
    $("fb-confirm-text").textContent = label === "real"
      ? "Save this image as a REAL photo (not generated) for training?"
      : "Save this image as FAKE (made by an image generator) for training?";
    $("fb-confirm").hidden = false;
    clear($("fb-result"));
    $("fb-yes").focus();
  }

  function cancelFeedback() {
    $("fb-confirm").hidden = true;
    var back = pendingLabel === "fake" ? $("fb-fake") : $("fb-real");
    pendingLabel = null;
    back.focus();
  }

  function sendFeedback() {
    if (!currentAnalysis || !pendingLabel) return;
    var label = pendingLabel;
    var analysisId = currentAnalysis.analysis_id;
    $("fb-confirm").hidden = true;
    setFeedbackButtons(true);
    var out = $("fb-result");
    clear(out);
    out.appendChild(el("p", { className: "muted", text: "Saving…" }));
    requestJSON("POST", API.feedback, { analysis_id: analysisId, label: label }).then(function (res) {
      clear(out);
      setFeedbackButtons(false);
      if (res.ok) {
        var d = res.data || {};
        var savedAs = typeof d.label === "string" ? d.label : label;
        var text = d.duplicate === true
          ? "Already saved: this image was labelled before; your answer (“" + savedAs + "”) is recorded once."
          : "Thank you — saved as “" + savedAs + "”.";
        var total = d.training_samples;
        var per = d.samples_per_label || {};
        var counts = " The training set now has " + num(total) + (total === 1 ? " sample (" : " samples (") +
          num(per.real) + " real, " + num(per.fake) + " fake).";
        out.appendChild(el("p", { className: "ok-box", "data-testid": "feedback-ok", text: text + counts }));
        if (d.sample_id !== undefined) out.appendChild(el("p", { className: "muted small-text", text: "Sample ID: " + show(d.sample_id) }));
        updateCounts(per, total);
        $("stats-updated").textContent = when(new Date().toISOString());
        loadStats();
      } else {
        var box = el("div", { className: "error-box" });
        out.appendChild(box);
        renderError(box, errorInfo(res, "saving your answer"));
        if (res.status === 0 || res.status >= 502) serviceProblem();
      }
    });
  }

  // ---------------------------------------------------------------- stats + retrain

  var statsSeq = 0;
  var maxUpload = null;

  function updateCounts(per, total) {
    per = per && typeof per === "object" ? per : {};
    $("count-real").textContent = num(per.real);
    $("count-fake").textContent = num(per.fake);
    if (!isNum(total) && isNum(per.real) && isNum(per.fake)) total = per.real + per.fake;
    $("count-total").textContent = num(total);
  }

  function renderMetrics(dl, metrics, previous) {
    clear(dl);
    if (!metrics || typeof metrics !== "object" || !Object.keys(metrics).length) {
      dl.appendChild(el("dt", { text: "Metrics" }));
      dl.appendChild(el("dd", { text: DASH }));
      return;
    }
    Object.keys(metrics).forEach(function (k) {
      var v = metrics[k];
      if (Array.isArray(v)) return;  // e.g. a confusion matrix: not for this panel
      dl.appendChild(el("dt", { text: humanize(k) }));
      var sub = metricNode(v, k);
      if (sub) {
        dl.appendChild(el("dd", { "data-metric": k }, [sub]));
        return;
      }
      var text = metricValue(v, k);
      if (previous && typeof previous === "object" && isNum(previous[k]) && isNum(v) &&
          metricValue(previous[k], k) !== text) {
        text += " (was " + metricValue(previous[k], k) + ")";
      }
      dl.appendChild(el("dd", { text: text, "data-metric": k }));
    });
  }

  function renderStats(d) {
    updateCounts(d.samples_per_label, d.training_samples);
    $("stats-updated").textContent = when(d.last_updated);
    var model = d.model && typeof d.model === "object" ? d.model : {};
    fillFacts($("model-facts"), [
      ["Version", show(model.version), "model-version"],
      ["Loaded", d.model_loaded === undefined ? DASH : (d.model_loaded ? "yes" : "no — analyses will fail until a model is trained")],
      ["Feature recipe", show(model.feature_version)],
      ["Trained", when(model.trained_at)],
      ["Source", model.source === "baseline" ? "built-in baseline" : show(model.source)]
    ]);
    var minPer = get(d, "retrain.min_feedback_per_label");
    $("retrain-help-min").textContent = isNum(minPer)
      ? " It needs at least " + minPer + " labelled images of each kind (real and fake)." : "";
    var limits = d.limits && typeof d.limits === "object" ? d.limits : null;
    if (limits) {
      maxUpload = isNum(limits.max_upload_bytes) ? limits.max_upload_bytes : null;
      var formats = Array.isArray(limits.formats) && limits.formats.length
        ? limits.formats.map(String).join(", ") : "PNG, JPEG, WebP, BMP, TIFF or GIF";
      $("file-help").textContent = formats + (maxUpload ? ", up to " + bytes(maxUpload) : "") +
        ". The image is sent only to this gateway, on this machine or your network.";
    }
    renderMetrics($("model-metrics"), model.metrics);
    $("metrics-words").textContent = metricsInWords(model.metrics);
    $("metrics-words").hidden = !$("metrics-words").textContent;
    var caps = typeof d.capabilities === "string" && d.capabilities ? d.capabilities : DEFAULT_CAPABILITIES;
    $("capabilities").textContent = caps;
    $("result-capabilities").textContent = caps;
    var running = get(d, "retrain.running") === true;
    if (running && !retraining) {
      $("retrain").disabled = true;
      $("retrain-progress").hidden = false;
      $("retrain-label").textContent = "A retraining started elsewhere is running…";
      setTimeout(loadStats, 2000);
    } else if (!running && !retraining) {
      $("retrain").disabled = false;
      $("retrain-progress").hidden = true;
    }
  }

  function loadStats() {
    var seq = ++statsSeq;
    $("stats-panel").setAttribute("aria-busy", "true");
    return requestJSON("GET", API.stats).then(function (res) {
      if (seq !== statsSeq) return;
      $("stats-panel").setAttribute("aria-busy", "false");
      if (res.ok && res.data && typeof res.data === "object") {
        $("stats-error").hidden = true;
        renderStats(res.data);
      } else {
        renderError($("stats-error"), errorInfo(res, "loading the statistics"));
        if (!$("capabilities").textContent) $("capabilities").textContent = DEFAULT_CAPABILITIES;
      }
    });
  }

  var retraining = false;

  function retrain() {
    if (retraining) return;
    retraining = true;
    var btn = $("retrain");
    btn.disabled = true;
    var out = $("retrain-result");
    clear(out);
    var started = Date.now();
    $("retrain-progress").hidden = false;
    $("retrain-bar").removeAttribute("value");
    $("retrain-label").textContent = "Retraining… 0 s";
    var tick = setInterval(function () {
      $("retrain-label").textContent = "Retraining… " + Math.round((Date.now() - started) / 1000) + " s";
    }, 1000);
    requestJSON("POST", API.retrain).then(function (res) {
      clearInterval(tick);
      retraining = false;
      btn.disabled = false;
      $("retrain-progress").hidden = true;
      var took = " (took " + duration(Date.now() - started) + ")";
      if (res.ok) {
        var d = res.data || {};
        var replaced = d.replaced === true;
        var box = el("div", { className: replaced ? "ok-box" : "info-box", "data-testid": "retrain-outcome" });
        box.appendChild(el("p", { className: "strong", text: replaced
          ? "New model in use: version " + show(d.model_version) + took + "."
          : "The current model was kept (version " + show(d.model_version) + ")" + took + "." }));
        if (d.reason) box.appendChild(el("p", { text: show(d.reason) }));
        var cmp = d.comparison;
        if (cmp && typeof cmp === "object" && cmp.old && cmp.new) {
          var fmt = function (x) { return isNum(x) ? x.toFixed(3) : DASH; };
          box.appendChild(el("p", { "data-testid": "retrain-comparison", text:
            "Held out, same split (" + show(cmp.test_images) + " images, " + show(cmp.folds) + " folds): " +
            "balanced accuracy " + fmt(cmp.old.balanced_accuracy) + " (current) → " + fmt(cmp.new.balanced_accuracy) +
            " (candidate); on feedback " + fmt(cmp.old.feedback_balanced_accuracy) + " → " +
            fmt(cmp.new.feedback_balanced_accuracy) + "." }));
        }
        if (d.metrics && typeof d.metrics === "object") {
          var words = metricsInWords(d.metrics);
          if (words) box.appendChild(el("p", { text: words.replace(/^In plain words: on/, "The new model, on") }));
          var dl = el("dl", { className: "facts metrics" });
          renderMetrics(dl, d.metrics, d.previous_metrics);
          box.appendChild(el("details", null, [
            el("summary", { text: "All measurements (previous model's in brackets where they changed)" }), dl]));
        }
        out.appendChild(box);
        loadStats();
      } else {
        var eb = el("div", { className: "error-box", "data-testid": "retrain-error" });
        out.appendChild(eb);
        var info = errorInfo(res, "retraining");
        renderError(eb, info);
        var needed = get(res.data, "needed");
        if (needed && typeof needed === "object") {
          var parts = [];
          if (isNum(needed.real) && needed.real > 0) parts.push(num(needed.real) + " more labelled real");
          if (isNum(needed.fake) && needed.fake > 0) parts.push(num(needed.fake) + " more labelled fake");
          if (parts.length) eb.appendChild(el("p", { text: "Still needed: " + parts.join(" and ") + "." }));
        }
        if (res.status === 0 || res.status >= 502) serviceProblem();
      }
    });
  }

  // ---------------------------------------------------------------- wiring

  function init() {
    var input = $("file-input");
    input.addEventListener("change", function () {
      if (input.files && input.files[0]) handleFile(input.files[0]);
      input.value = "";  // choosing the same file again triggers change again
    });
    var zone = $("dropzone");
    var depth = 0;
    ["dragenter", "dragover"].forEach(function (t) {
      zone.addEventListener(t, function (ev) {
        ev.preventDefault();
        if (t === "dragenter") depth++;
        if (ev.dataTransfer) ev.dataTransfer.dropEffect = "copy";
        zone.classList.add("dragging");
      });
    });
    zone.addEventListener("dragleave", function () {
      depth = Math.max(0, depth - 1);
      if (!depth) zone.classList.remove("dragging");
    });
    zone.addEventListener("drop", function (ev) {
      ev.preventDefault();
      depth = 0;
      zone.classList.remove("dragging");
      var files = ev.dataTransfer && ev.dataTransfer.files;
      if (files && files.length) handleFile(files[0]);
    });
    // a file dropped outside the zone must not navigate away from the page
    window.addEventListener("dragover", function (ev) { ev.preventDefault(); });
    window.addEventListener("drop", function (ev) {
      ev.preventDefault();
      var files = ev.dataTransfer && ev.dataTransfer.files;
      if (files && files.length) handleFile(files[0]);
    });

    $("upload-cancel").addEventListener("click", function () { if (currentXhr) currentXhr.abort(); });
    $("fb-real").addEventListener("click", function () { askFeedback("real"); });
    $("fb-fake").addEventListener("click", function () { askFeedback("fake"); });
    $("fb-yes").addEventListener("click", sendFeedback);
    $("fb-no").addEventListener("click", cancelFeedback);
    $("fb-confirm").addEventListener("keydown", function (ev) { if (ev.key === "Escape") cancelFeedback(); });
    $("stats-refresh").addEventListener("click", loadStats);
    $("retrain").addEventListener("click", retrain);
    $("capabilities").textContent = DEFAULT_CAPABILITIES;
    $("result-capabilities").textContent = DEFAULT_CAPABILITIES;
    var resizeTimer = null;
    var lastWidth = window.innerWidth;
    window.addEventListener("resize", function () {
      if (window.innerWidth === lastWidth) return;
      lastWidth = window.innerWidth;
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(function () {
        if (lastSpectrum && !$("spectrum-panel").hidden) renderSpectrum(lastSpectrum);
      }, 150);
    });

    $("token-form").addEventListener("submit", submitToken);
    pollStatus();  // then the statistics (startStats), once the page knows it may
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
