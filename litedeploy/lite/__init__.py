"""`litedeploy lite`: model compression (AWQ weight quantization).

BUILTIN_CALIB_TEXTS are the calibration samples we ship (no dataset download): plain English
prose written for this project, a few KB, used by `--calib-dataset builtin` (the default).
"""

from __future__ import annotations

BUILTIN_CALIB_TEXTS: dict[str, str] = {
    "builtin": """\
The harbour town woke slowly on winter mornings. Fishing boats came in before dawn, their decks \
white with frost, and the men who worked them carried crates of cod and mackerel up the stone \
ramp to the market hall. By seven the bakery on the corner had opened its shutters, and the smell \
of fresh bread drifted down the narrow street toward the water. Children walked to school in \
pairs, stopping to look at the gulls that quarrelled over scraps near the nets.

Most of the people who lived there had been born in the town, and many of them expected to die \
there as well. They knew the tides the way city people know the timetable of a train. When a \
storm was coming, the older fishermen could feel it in their knees a day before the radio warned \
of it. Their grandchildren laughed at this, but they also checked the sky before they went out.

A library stood at the top of the hill, built a century ago with money left by a merchant who \
had made his fortune in the tea trade. It had tall windows, a creaking wooden floor and a reading \
room that was always slightly too cold. The librarian, a patient woman named Ada, had worked \
there for thirty years. She believed that every question deserved a careful answer, and that \
the best answers usually led to better questions.

Science begins with the same habit. A good experiment changes one thing at a time and measures \
what happens. If a bridge must carry heavy trucks, engineers first calculate the loads, then test \
small models, and only then pour concrete. Mistakes found on paper are cheap; mistakes found in \
steel are expensive. For this reason careful people write down their assumptions, check their \
units, and ask a colleague to read their work before they trust it.

Computers follow instructions exactly, which is both their strength and their weakness. A program \
does not understand what its author meant; it does only what the author wrote. When software \
fails, the fault is usually a small misunderstanding between the two. Programmers therefore \
write tests that describe what the code should do, run them often, and read error messages \
slowly, because the message often says precisely what is wrong.

Language models learn patterns from large amounts of text. Given the beginning of a sentence, \
they estimate which word is likely to come next, and by repeating this step they can write whole \
paragraphs. They do not look facts up; they reproduce regularities they have seen. That is why \
they can be fluent and still be wrong, and why their answers should be checked against sources.

In spring the town changed. Tourists arrived with cameras and maps, the cafes put tables on the \
pavement, and the ferry to the islands ran twice a day instead of once. Ada opened the library \
windows and let the sea air into the reading room. A boy who had spent the winter reading about \
volcanoes asked her whether the hill under the library had ever been one. She smiled, found him \
a geological map of the coast, and together they traced the old lava flows down to the harbour.

Cooking is a kind of chemistry practised at home. Heat turns sugar into caramel, makes proteins \
firm and lets bread rise as yeast releases gas into the dough. A recipe is a tested procedure: \
measure the flour, warm the milk, rest the dough for an hour, bake it until the crust sounds \
hollow when tapped. Experienced cooks improvise, but they improvise from a foundation of rules \
they learned by following recipes carefully, many times, until the steps became second nature.
""",
}
