// buildbot-dockerami: the Fleet page in buildbot's web UI.
// Plain JavaScript on the globals buildbot's UI exports (React, BuildbotPluginSupport),
// so it needs no build step. Data: plugins/dockerami/api/fleet, polled 2 s after each
// answer (never two requests at once from one tab); leaving the page cancels the poll.
// Buttons use the Bootstrap 4 classes buildbot's stylesheet ships (btn-primary, btn-danger).
(function () {
  "use strict";
  var React = window.React;
  var h = React.createElement;
  var API = "plugins/dockerami/api/fleet";
  var CONTROL = "plugins/dockerami/api/control";

  // Controls answer JSON; a refusal (403: not authorized) is shown, never hidden.
  function send(body, report) {
    return fetch(CONTROL, {method: "POST", headers: {"Content-Type": "application/json"},
                           body: JSON.stringify(body)})
      .then(function (r) { return r.json().then(function (d) { return [r.status, d]; }); })
      .then(function (res) {
        report(res[0] === 200 ? {ok: res[1].message} : {error: res[1].error || ("HTTP " + res[0])});
      }, function (e) { report({error: String(e)}); });
  }

  function button(label, className, onClick) {
    return h("button", {type: "button", className: "btn btn-sm " + className, onClick: onClick},
             label);
  }

  // Terminate ends a machine (and fails a build running on it): ask first.
  function confirmed(question, action) {
    return function () { if (window.confirm(question)) action(); };
  }

  // Local date and time, sortable and unambiguous: 2026-11-28 17:05:09.
  function when(epoch) {
    var d = new Date(epoch * 1000);
    function two(n) { return (n < 10 ? "0" : "") + n; }
    return d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + " " +
      two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }

  function ago(seconds) {
    if (seconds == null) return "";
    var s = Math.max(0, Math.round(seconds));
    if (s < 120) return s + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  // How the image got ready: on the disk already (baked into the AMI), or pulled.
  function howReady(ready) {
    if (!ready) return "";
    if (ready.already_present) return " (already present)";
    return ready.pull_seconds == null ? "" : " (pulled in " + ready.pull_seconds.toFixed(1) + " s)";
  }

  // One line per step: keeps the column narrow enough for a 1280 px window.
  function timeline(t, ready) {
    if (!t || t.requested == null) return "";
    // Capacity fallbacks ("fallback N: <option>: <code>") and a start from the stopped
    // pool come first, in the order they happened.
    var extra = Object.keys(t).filter(function (k) {
      return k.indexOf("fallback ") === 0 || k === "started_from_stopped";
    }).sort(function (a, b) { return t[a] - t[b]; }).map(function (k) {
      return [k, k === "started_from_stopped" ? "started stopped instance" : k];
    });
    // The rest by time (the master sees "running" only when it next asks EC2, so the
    // image may be ready before that); ties keep this order.
    var steps = [["running", "instance running"], ["image_ready", "image ready", howReady(ready)],
                 ["connected", "worker connected"], ["build_started", "build started"]]
      .filter(function (s) { return t[s[0]] != null; })
      .map(function (s, i) { return [s, i]; })
      .sort(function (a, b) { return (t[a[0][0]] - t[b[0][0]]) || (a[1] - b[1]); })
      .map(function (p) { return p[0]; });
    return ["requested"].concat(extra.concat(steps)
      .map(function (s) { return "\u2192 " + s[1] + " +" + (t[s[0]] - t.requested).toFixed(1) + " s" +
                          (s[2] || ""); }))
      .map(function (text) { return h("span", {key: text, className: "dockerami-step"}, text); });
  }

  function buildLinks(builds) {
    return builds.map(function (b) {
      return h("div", {key: b.buildid}, h("a", {
        href: "#/builders/" + b.builderid + "/builds/" + b.number, className: "dockerami-build"},
        b.builder + " #" + b.number));
    });
  }

  function WorkerRow(props) {
    var w = props.worker, i = w.instance || {}, report = props.report;
    var controls = [];
    if (w.state === "not running") {
      controls.push(button("Start now", "btn-primary dockerami-prewarm", function () {
        send({action: "prewarm", worker: w.name}, report); }));
    }
    if (w.instance) {
      controls.push(button("Terminate", "btn-danger dockerami-terminate", confirmed(
        "Terminate instance " + i.id + " of worker " + w.name + "?" +
          (w.builds.length ? " Its running build will be interrupted." : ""),
        function () { send({action: "terminate", worker: w.name}, report); })));
    }
    var where = [i.type, i.availability_zone, i.market].filter(Boolean).join(" \u00b7 ");
    var running = [i.uptime_seconds == null ? "" : "up " + ago(i.uptime_seconds),
                   i.cost_so_far == null ? "" : "$" + i.cost_so_far.toFixed(4)];
    return h("tr", {"data-worker": w.name, className: "dockerami-worker"},
      h("td", {className: "dockerami-name"}, w.workerid == null ? w.name
        : h("a", {className: "dockerami-worker-link", href: "#/workers/" + w.workerid}, w.name)),
      h("td", null,
        h("div", {className: "dockerami-state", title: w.last_failure || ""},
          w.state + (w.paused ? " (paused)" : "") +
          ((w.state === "quarantine" || w.state === "not running") && w.last_failure
            ? ": " + w.last_failure : "")),
        buildLinks(w.builds)),
      h("td", null, h("div", {className: "dockerami-instance"}, i.id || ""),
        where ? h("small", {className: "text-muted"}, where) : null,
        i.retired ? h("div", {className: "dockerami-retired text-danger", title: i.retired},
                      "retiring: " + i.retired) : null),
      h("td", {className: "dockerami-image"}, i.image || ""),
      h("td", null,
        i.launched_at ? h("div", {className: "dockerami-launched",
                                  title: new Date(i.launched_at * 1000).toString()},
                          when(i.launched_at)) : null,
        running.join("") ? h("small", {className: "text-muted dockerami-running"},
                             running.filter(Boolean).join(" \u00b7 ")) : null),
      h("td", {className: "dockerami-timeline"}, timeline(w.timeline, w.image_ready)),
      h("td", {className: "dockerami-controls"}, controls));
  }

  function PoolRow(props) {
    var name = props.name, p = props.pool;
    var capState = React.useState(p.cap == null ? "" : String(p.cap));
    var warmState = React.useState(String(p.min_warm));
    function apply() {
      var cap = capState[0].trim() === "" ? null : parseInt(capState[0], 10);
      send({action: "set_pool", pool: name, cap: cap, min_warm: parseInt(warmState[0] || "0", 10)},
           props.report);
    }
    return h("tr", {"data-pool": name},
      h("td", null, name),
      h("td", null, p.instances), h("td", null, p.idle),
      h("td", null, h("input", {className: "dockerami-cap", size: 4, placeholder: "none",
        value: capState[0], onChange: function (e) { capState[1](e.target.value); }})),
      h("td", null, h("input", {className: "dockerami-min-warm", size: 4,
        value: warmState[0], onChange: function (e) { warmState[1](e.target.value); }})),
      h("td", null, button("Apply", "btn-primary dockerami-apply-pool", apply)));
  }

  // Polls url: the next request only `interval` ms after the previous answer (a slow
  // master is never sent a second request while it still works on the first); stop()
  // aborts the request in flight, whose AbortError is expected and not reported.
  function poller(url, interval, onData, onError) {
    var controller = null, timer = null, stopped = false, again = false;
    function schedule(delay) { clearTimeout(timer); timer = setTimeout(load, delay); }
    function load() {
      timer = null;
      controller = new AbortController();
      fetch(url, {signal: controller.signal, headers: {Accept: "application/json"}})
        .then(function (r) {
          if (!r.ok) throw new Error("HTTP " + r.status);
          return r.json();
        })
        .then(function (d) { if (!stopped) onData(d); },
              function (e) { if (!stopped && e.name !== "AbortError") onError(String(e)); })
        .then(function () {
          controller = null;
          if (!stopped) schedule(again ? 0 : interval);
          again = false;
        });
    }
    load();
    return {
      // Refresh soon (after a control), still one request at a time.
      now: function () { if (controller) again = true; else if (!stopped) schedule(0); },
      stop: function () { stopped = true; clearTimeout(timer); if (controller) controller.abort(); }
    };
  }

  function FleetPage() {
    var state = React.useState(null), data = state[0], setData = state[1];
    var err = React.useState(null), error = err[0], setError = err[1];
    var msg = React.useState(null), outcome = msg[0], setOutcome = msg[1];
    var poll = React.useRef(null);
    React.useEffect(function () {
      poll.current = poller(API, 2000, function (d) { setData(d); setError(null); }, setError);
      return function () { poll.current.stop(); };
    }, []);
    function report(result) {
      setOutcome(result);
      if (poll.current) poll.current.now();
    }
    if (!data) return h("div", {className: "container"}, error ? "Fleet: " + error : "Loading fleet\u2026");
    var head = ["Worker", "State, build", "Instance", "Image", "Launched, cost so far",
                "Provisioning", ""];
    return h("div", {className: "container-fluid dockerami-fleet"},
      h("h2", null, "Fleet"),
      h("p", null, "Master " + data.master_id + ". " + data.workers.length + " workers."),
      outcome ? h("p", {className: "dockerami-outcome " +
                          (outcome.error ? "text-danger" : "text-success")},
                  outcome.error || outcome.ok) : null,
      h("table", {className: "table table-sm table-striped dockerami-workers"},
        h("thead", null, h("tr", null, head.map(function (c) { return h("th", {key: c}, c); }))),
        h("tbody", null, data.workers.map(function (w) {
          return h(WorkerRow, {key: w.name, worker: w, report: report});
        }))),
      Object.keys(data.pools).length
        ? h("div", null, h("h3", null, "Pools"),
            h("table", {className: "table table-sm dockerami-pools"},
              h("thead", null, h("tr", null, ["Pool", "Instances", "Idle", "Cap",
                "Warm minimum", ""].map(function (c) { return h("th", {key: c}, c); }))),
              h("tbody", null, Object.keys(data.pools).map(function (name) {
                return h(PoolRow, {key: name, name: name, pool: data.pools[name],
                                   report: report});
              }))))
        : null,
      (data.fleet || []).some(function (r) { return !r.here; })
        ? h("div", null, h("h3", null, "Other masters' instances (only their own master acts on them)"),
            h("table", {className: "table table-condensed dockerami-other-masters"},
              h("thead", null, h("tr", null, ["Master", "Workers", "Instance", "State", "Type", "Pool"]
                .map(function (c) { return h("th", {key: c}, c); }))),
              h("tbody", null, data.fleet.filter(function (r) { return !r.here; }).map(function (r) {
                return h("tr", {key: r.masterid + "/" + r.owner, "data-instance": r.instance_id},
                  h("td", null, r.master + (r.master_active ? "" : " (inactive)")),
                  h("td", null, r.workers.join(", ")), h("td", null, r.instance_id),
                  h("td", null, r.state), h("td", null, r.instance_type), h("td", null, r.pool || ""));
              }))))
        : null,
      h("h3", null, "Orphaned instances"),
      data.orphans.length === 0
        ? h("p", {className: "dockerami-no-orphans"}, "None: every instance tagged for this master is owned by a worker.")
        : h("table", {className: "table table-sm dockerami-orphans"},
            h("thead", null, h("tr", null, ["Instance", "State", "Type", "AZ", ""].map(function (c) {
              return h("th", {key: c}, c); }))),
            h("tbody", null, data.orphans.map(function (o) {
              return h("tr", {key: o.id, "data-orphan": o.id},
                h("td", null, o.id), h("td", null, o.state), h("td", null, o.type),
                h("td", null, o.availability_zone),
                h("td", null, button("Terminate", "btn-danger dockerami-terminate-orphan",
                  confirmed("Terminate orphaned instance " + o.id + "?", function () {
                    send({action: "terminate_orphan", instance_id: o.id}, report); }))));
            }))),
      (data.stopped || []).length
        ? h("div", null, h("h3", null, "Stopped for reuse"),
            h("table", {className: "table table-sm dockerami-stopped"},
              h("thead", null, h("tr", null, ["Instance", "Worker", "Type", "Stopped for",
                "Storage cost"].map(function (c) { return h("th", {key: c}, c); }))),
              h("tbody", null, data.stopped.map(function (e) {
                return h("tr", {key: e.id, "data-stopped": e.id},
                  h("td", null, e.id), h("td", null, e.worker), h("td", null, e.type),
                  h("td", null, ago(e.stopped_seconds)),
                  h("td", null, e.storage_cost_so_far == null ? "" :
                    "$" + e.storage_cost_so_far.toFixed(4)));
              }))))
        : null,
      data.terminations_failing.length
        ? h("p", {className: "text-danger"}, "Terminations failing (retried every minute): " +
            data.terminations_failing.join(", "))
        : null,
      error ? h("p", {className: "text-warning"}, "Last refresh failed: " + error) : null);
  }

  window.BuildbotPluginSupport.buildbotSetupPlugin(function (reg) {
    reg.registerMenuGroup({name: "dockerami", caption: "Fleet", icon: h("span", null, "\u2601"),
                           order: 20, route: "/dockerami", parentName: null});
    reg.registerRoute({route: "/dockerami", group: "dockerami", element: function () {
      return h(FleetPage);
    }});
  });
})();
