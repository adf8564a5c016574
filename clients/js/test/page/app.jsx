// The page tests/browser.rs drives in Chromium: a React app built with esbuild from the
// package's build (dist), showing a tenant's notes live with useFeed over the fetch
// transport. `?gateway=<url>&token=<jwt>` say where and as whom.
import { useState } from "react";
import { createRoot } from "react-dom/client";
import { applyChange } from "@pgfeed/client";
import { useFeed } from "@pgfeed/client/react";

const params = new URLSearchParams(location.search);

function Notes() {
  const [rows, setRows] = useState(() => new Map());
  const [changes, setChanges] = useState(0);
  const feed = useFeed({
    url: params.get("gateway"),
    token: () => params.get("token"),
    tables: "notes",
    onChange: (change) => {
      setRows((current) => applyChange(new Map(current), change));
      setChanges((n) => n + 1);
    },
  });
  return (
    <main style={{ font: "16px sans-serif", margin: "2em" }}>
      <h1>Notes, live</h1>
      <p id="status" data-status={feed.status} data-transport={feed.feed?.transport ?? ""}>
        {feed.status}, {changes} changes
      </p>
      <ul id="rows">
        {[...rows.values()].map((row) => (
          <li key={row.id} data-id={row.id}>
            {row.body}
          </li>
        ))}
      </ul>
    </main>
  );
}

createRoot(document.getElementById("root")).render(<Notes />);
