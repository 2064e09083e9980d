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

  function bytes(n) {
    var gib = n / 1073741824;
    return gib >= 1 ? (Math.round(gib * 10) / 10) + " GiB" : Math.round(n / 1048576) + " MiB";
  }

  // A container's memory, pids and CPU limits: as it reported them at connect, else as
  // configured (a limit not configured is the bootstrap's default).
  function limits(l) {
    if (!l) return "";
    var shown = l.applied || l.configured;
    if (!Object.keys(shown).length) return "";
    var text = ["memory", "pids", "cpus"].map(function (k) {
      if (!(k in shown)) return k + " default";
      var v = shown[k];
      if (v == null) return k + " unlimited";
      return k + " " + (k === "memory" ? bytes(v) : String(v));
    }).join(" \u00b7 ");
    return "limits: " + text + (l.applied ? "" : " (configured)");
  }

  // Dollars: four decimals, or six below a cent (a short build on a small instance).
  function usd(value) {
    return "$" + value.toFixed(Math.abs(value) < 0.01 ? 6 : 4);
  }

  // The worker's last finished build and what its share of the instance cost.
  function lastBuildCost(c) {
    if (!c) return null;
    var what = (c.builder ? c.builder + " " : "") + (c.number == null ? "" : "#" + c.number);
    return h("div", null, h("small", {className: "text-muted dockerami-last-build-cost", title:
      c.share_seconds + " s of the instance's time, at $" + c.usd_per_hour + "/h (" +
      c.price_source + ")"}, "last build " + (what ? what + " " : "") + usd(c.usd)));
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
    if (!props.controls) {
      // Only users whom the master lets use them see the controls (the API refuses others).
    } else if (w.state === "not running") {
      controls.push(button("Start now", "btn-primary dockerami-prewarm", function () {
        send({action: "prewarm", worker: w.name}, report); }));
    }
    if (props.controls && w.instance) {
      controls.push(button("Terminate", "btn-danger dockerami-terminate", confirmed(
        "Terminate instance " + i.id + " of worker " + w.name + "?" +
          (w.builds.length ? " Its running build will be interrupted." : ""),
        // The instance shown: if the worker has another one by now, the API refuses.
        function () { send({action: "terminate", worker: w.name, instance_id: i.id}, report); })));
    }
    var where = [i.type, i.availability_zone, i.market].filter(Boolean).join(" \u00b7 ");
    var running = [i.uptime_seconds == null ? "" : "up " + ago(i.uptime_seconds),
                   i.cost_so_far == null ? "" : usd(i.cost_so_far)];
    return h("tr", {"data-worker": w.name, className: "dockerami-worker"},
      h("td", {className: "dockerami-name"}, w.workerid == null ? w.name
        : h("a", {className: "dockerami-worker-link", href: "#/workers/" + w.workerid}, w.name)),
      h("td", null,
        h("div", {className: "dockerami-state", title: w.last_failure || ""},
          // The state's words never break; a long failure reason may, anywhere.
          h("span", {className: "dockerami-state-word"}, w.state + (w.paused ? " (paused)" : "")),
          ((w.state === "quarantine" || w.state === "not running") && w.last_failure
            ? ": " + w.last_failure : "")),
        buildLinks(w.builds)),
      h("td", null, h("div", {className: "dockerami-instance"}, i.id || ""),
        where ? h("small", {className: "text-muted"}, where) : null,
        limits(w.container_limits) ? h("div", null, h("small",
          {className: "text-muted dockerami-limits"}, limits(w.container_limits))) : null,
        // A planned drain (max builds, age, refresh, rebalance) is no fault: not red.
        i.retired ? h("div", {className: "dockerami-retired " + (i.draining
                                ? "dockerami-draining text-info" : "text-danger"),
                              title: i.retired},
                      (i.draining ? "draining: " : "retiring: ") + i.retired) : null),
      h("td", {className: "dockerami-image", title: i.image_digest || ""}, i.image || "",
        i.image_digest ? h("div", null, h("small", {className: "text-muted dockerami-image-digest"},
                                          i.image_digest.slice(0, 19) + "\u2026")) : null),
      h("td", null,
        i.launched_at ? h("div", {className: "dockerami-launched",
                                  title: new Date(i.launched_at * 1000).toString()},
                          when(i.launched_at)) : null,
        running.join("") ? h("small", {className: "text-muted dockerami-running",
                                       title: i.price_source || ""},
                             running.filter(Boolean).join(" \u00b7 ")) : null,
        lastBuildCost(w.last_build_cost)),
      h("td", {className: "dockerami-timeline"}, timeline(w.timeline, w.image_ready)),
      h("td", {className: "dockerami-controls"}, controls));
  }

  // A configured warm minimum: the period in force, the next one, how far ahead the
  // pool warms (its measured provisioning time), and the page's override if any.
  function periods(s) {
    if (!s) return null;
    var now = s.current, next = s.next;
    return [
      h("div", {key: "now", className: "dockerami-schedule-now"}, "now: " + now.period +
        " \u2192 " + now.value + (now.until ? " until " + when(now.until) : "")),
      next ? h("div", {key: "next", className: "dockerami-schedule-next"}, "next: " +
        next.period + " \u2192 " + next.value + " from " + when(next.start)) : null,
      h("small", {key: "lead", className: "text-muted dockerami-schedule-lead"}, "warms " +
        ago(s.lead_seconds) + " ahead" + (s.lead_measured ? " (measured)" : " (default)")),
      s.override == null ? null : h("div", {key: "override",
        className: "text-warning dockerami-schedule-override"},
        "overridden here: " + s.override + " (clear the field to follow the schedule)")
    ];
  }

  function PoolRow(props) {
    var name = props.name, p = props.pool, scheduled = !!p.schedule;
    var capState = React.useState(p.cap == null ? "" : String(p.cap));
    // With a configured minimum the field holds only the page's override (empty: follow it).
    var warmState = React.useState(scheduled ? (p.schedule.override == null ? ""
                                                : String(p.schedule.override))
                                             : String(p.min_warm));
    function apply() {
      var cap = capState[0].trim() === "" ? null : parseInt(capState[0], 10);
      var warm = warmState[0].trim() === "" ? (scheduled ? null : 0) : parseInt(warmState[0], 10);
      send({action: "set_pool", pool: name, cap: cap, min_warm: warm}, props.report);
    }
    return h("tr", {"data-pool": name},
      h("td", null, name),
      h("td", null, p.instances), h("td", null, p.idle),
      props.controls
        ? h("td", null, h("input", {className: "dockerami-cap", size: 4, placeholder: "none",
            value: capState[0], onChange: function (e) { capState[1](e.target.value); }}))
        : h("td", null, p.cap == null ? "none" : p.cap),
      props.controls
        ? h("td", null, h("input", {className: "dockerami-min-warm", size: 4,
            placeholder: scheduled ? String(p.min_warm) : "",
            title: scheduled ? "empty: the configured minimum (now " + p.min_warm + ")" : "",
            value: warmState[0], onChange: function (e) { warmState[1](e.target.value); }}))
        : h("td", null, p.min_warm),
      h("td", {className: "dockerami-schedule"}, periods(p.schedule)),
      h("td", null, props.controls
        ? button("Apply", "btn-primary dockerami-apply-pool", apply) : null));
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

  // Instances by state over the last hours, from the master's own samples (the API's
  // history: a [t, count per state...] row a minute, and `now`, counted at this answer):
  // stacked areas. Inline SVG stretched to the box's width; its text is HTML, unstretched.
  var STATE_COLOURS = {booting: "#f0ad4e", connected: "#5bc0de", building: "#5cb85c",
                       idle: "#9aa9c2", terminating: "#d9534f", stopped: "#adb5bd"};

  function HistoryChart(props) {
    var hist = props.history;
    if (!hist || !hist.samples || !hist.samples.length) return null;
    var rows = hist.now ? hist.samples.concat([hist.now]) : hist.samples;
    var states = hist.states, W = 600, H = 90;
    var end = rows[rows.length - 1][0];
    var start = Math.max(rows[0][0], end - hist.span);
    var width = Math.max(end - start, 1);
    function total(row, upto) {
      return row.slice(1, upto + 1).reduce(function (a, b) { return a + b; }, 0);
    }
    var most = Math.max(1, Math.max.apply(null, rows.map(function (r) {
      return total(r, states.length); })));
    function x(t) { return ((Math.max(t, start) - start) / width * W).toFixed(1); }
    function y(v) { return (H - v / most * H).toFixed(1); }
    var areas = states.map(function (state, k) {
      var upper = rows.map(function (r) { return x(r[0]) + "," + y(total(r, k + 1)); });
      var lower = rows.map(function (r) { return x(r[0]) + "," + y(total(r, k)); }).reverse();
      return h("path", {key: state, "data-state": state, fill: STATE_COLOURS[state] || "#6c757d",
                        d: "M" + upper.concat(lower).join("L") + "Z"}, h("title", null, state));
    });
    var last = rows[rows.length - 1];
    var legend = states.map(function (state, k) {
      return h("span", {key: state, className: "dockerami-history-key"},
        h("span", {className: "dockerami-swatch", style: {background: STATE_COLOURS[state]}}),
        state + " " + last[k + 1]);
    });
    return h("div", {className: "dockerami-history"},
      h("div", {className: "dockerami-history-title"},
        "Instances of this master by state, last " + ago(end - start) +
        "; top of the chart: " + most),
      h("svg", {className: "dockerami-history-chart", viewBox: "0 0 " + W + " " + H,
                preserveAspectRatio: "none", width: "100%", height: H, role: "img",
                "data-samples": hist.samples.length, "aria-label": "instances by state over time"},
        areas),
      h("div", {className: "dockerami-history-axis"},
        h("span", null, when(start).slice(11, 16)), h("span", null, when(end).slice(11, 16))),
      h("div", null, legend));
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
      h("p", null, "Master " + data.master_id + ". " + data.workers.length + " workers.",
        data.cost ? h("span", {className: "dockerami-cost-today", title:
          "This master's instances since " + (data.cost.counting_since ?
            when(data.cost.counting_since) : "it started") + " (estimated)" +
          (data.cost.spot_prices_error ? "; " + data.cost.spot_prices_error : "")},
          " Today (UTC " + data.cost.day + "): " + usd(data.cost.today_usd) + ".") : null),
      h(HistoryChart, {history: data.history}),
      data.mq_error ? h("p", {className: "text-danger dockerami-mq-error"},
        "No working message queue: " + data.mq_error) : null,
      data.shared_error ? h("p", {className: "text-danger dockerami-shared-error"},
        "The shared fleet tables could not be read: " + data.shared_error) : null,
      data.controls ? null : h("p", {className: "text-muted dockerami-no-controls"},
        "Start now, Terminate and the pool settings are shown to users allowed to control " +
        "workers: log in to use them."),
      outcome ? h("p", {className: "dockerami-outcome " +
                          (outcome.error ? "text-danger" : "text-success")},
                  outcome.error || outcome.ok) : null,
      h("table", {className: "table table-sm table-striped dockerami-workers"},
        h("thead", null, h("tr", null, head.map(function (c) { return h("th", {key: c}, c); }))),
        h("tbody", null, data.workers.map(function (w) {
          return h(WorkerRow, {key: w.name, worker: w, report: report,
                               controls: data.controls});
        }))),
      Object.keys(data.pools).length
        ? h("div", null, h("h3", null, "Pools"),
            h("table", {className: "table table-sm dockerami-pools"},
              h("thead", null, h("tr", null, ["Pool", "Instances", "Idle", "Cap",
                "Warm minimum", "Schedule", ""].map(function (c) { return h("th", {key: c}, c); }))),
              h("tbody", null, Object.keys(data.pools).map(function (name) {
                return h(PoolRow, {key: name, name: name, pool: data.pools[name],
                                   report: report, controls: data.controls});
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
                h("td", null, data.controls ? button("Terminate", "btn-danger dockerami-terminate-orphan",
                  confirmed("Terminate orphaned instance " + o.id + "?", function () {
                    send({action: "terminate_orphan", instance_id: o.id}, report); })) : null));
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
